# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Validating the closed-form solvers against NUTS
#
# Every model of the zoo is written twice: a PyMC model that states the
# generative story, and a hand-derived solver (EM or mean-field VB) fast
# enough for full volumes. This notebook shows how the project proves the
# second against the first, and what the checks can and cannot see:
#
# 1. **the cross-check** (`bayesfuse.crosscheck`, `bayesfuse check`): NUTS on
#    a downsampled problem with the hyperparameters pinned at the solver's
#    estimates, so that both target the same posterior; per-element
#    **z-scores**, **sd ratios** and coverage, the mode check, and PSIS
#    **k-hat**. We recompute the statistics by hand, and check that they
#    would catch a wrong solver;
# 2. **simulation-based calibration** (SBC): truths drawn from the prior,
#    data from the story, and where the truth falls among the solver's
#    draws. A correct posterior puts it anywhere with equal probability; an
#    overconfident one piles it at the ends;
# 3. **what mean-field misses**: on a Gaussian fusion model whose exact
#    posterior we can write down, mean-field VB gets every mean right and
#    every variance too small, and k-hat says so.
#
# The pass criteria of each model, and why, are in its card (section
# "Cross-check") and in `bayesfuse/crosscheck_models.py`.
# `BAYESFUSE_NOTEBOOK_SMALL=1` selects small settings.

# %% tags=["parameters"]
import os

SMALL = os.environ.get("BAYESFUSE_NOTEBOOK_SMALL", "0") == "1"
DOWNSAMPLE = 6 if SMALL else 4        # the 64 x 64 x 48 phantom, block size for the cross-check
DRAWS = 300 if SMALL else 1000         # NUTS draws per chain (as many tuning steps)
CHAINS = 4                             # run in parallel; compiling, not sampling, is the cost
SBC_SIMS = 40 if SMALL else 200        # simulations of the SBC
SBC_SHAPE = (10, 10, 6) if SMALL else (16, 16, 12)
MF_VOXELS = 15 if SMALL else 60        # voxels of the mean-field example
N_RATERS = 4
SEED = 1

# %%
import time

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pymc as pm
import xarray as xr
from arviz_plots import plot_ecdf_pit

from bayesfuse import crosscheck, crosscheck_figures, crosscheck_sbc, crosscheck_stats, phantoms
from bayesfuse import gaussian as G
from bayesfuse.models import robust_t as rt
from bayesfuse.models import staple

# %% [markdown]
# ## 1. The cross-check, on STAPLE
#
# A phantom with five raters (`phantoms.make_phantom("simple")`), downsampled
# by block majority so that NUTS is quick. `crosscheck.run` fits EM, builds
# the PyMC model with `hyper="fixed"` at EM's class prior, samples it with
# nutpie, checks that NUTS is healthy ($\hat R \le 1.01$, ESS $\ge 400$, no
# divergences: otherwise it claims nothing), and compares.

# %%
ph = phantoms.make_phantom("simple", n_raters=5, random_seed=SEED)
small = ph.raters.downsample(DOWNSAMPLE, how="majority")
t0 = time.perf_counter()
check = crosscheck.run(small, "staple", draws=DRAWS, tune=DRAWS, chains=CHAINS, random_seed=SEED,
                       note=f"phantom 'simple' downsampled x{DOWNSAMPLE}")
print(f"({time.perf_counter() - t0:.0f} s, of which NUTS compile {check.compile_seconds:.0f} s)")
print(check.verdict())

# %% [markdown]
# What the lines mean, for a parameter $\theta_j$ with NUTS draws (the
# reference) and draws from the solver's $q$ (for EM: a Laplace
# approximation around the mode, in logit space):
#
# - **z-score** $z_j = (\bar\theta^q_j - \bar\theta^\text{NUTS}_j)/\text{sd}^\text{NUTS}_j$:
#   how far $q$'s centre is from the posterior's, in posterior sd.
# - **sd ratio** $\text{sd}^q_j/\text{sd}^\text{NUTS}_j$: 1 if $q$ has the
#   right spread; below 1 it is overconfident.
# - **coverage**: the share of NUTS draws inside $q$'s central 90 % interval.
# - **mode** (EM only): EM claims the posterior *mode*; no NUTS draw may have
#   a higher log density, and polishing the best draw must not find one.
# - **k-hat**: Pareto-smoothed importance sampling of the posterior with $q$
#   as proposal. $\hat k < 0.5$: $q$ covers the posterior well; $> 0.7$: $q$
#   misses posterior mass (usually: too narrow).
#
# By hand, from the two sets of draws, against the harness's numbers:

# %%
nuts_sens = check.nuts["posterior"]["sensitivity"]
q_sens = check.q_draws["posterior"]["sensitivity"]
flat = lambda da: da.values.reshape(-1, da.shape[-1])  # (draws, rater)
z = (flat(q_sens).mean(0) - flat(nuts_sens).mean(0)) / flat(nuts_sens).std(0, ddof=1)
ratio = flat(q_sens).std(0, ddof=1) / flat(nuts_sens).std(0, ddof=1)
print("z by hand:       ", z.round(3))
print("z (harness):     ", check.stats["sensitivity"]["zscore"].values.round(3))
print("sd ratio by hand:", ratio.round(3))
print("(a sensitivity that EM puts at 1 has a point q there: sd ratio 0; the criteria compare interior elements)")
np.testing.assert_allclose(z, check.stats["sensitivity"]["zscore"].values, rtol=1e-10, atol=1e-12)
np.testing.assert_allclose(ratio, check.stats["sensitivity"]["sd_ratio"].values, rtol=1e-10)
print(check.summary[["variable", "compared", "z_abs_max", "sd_ratio_median", "coverage_mean", "khat", "passed"]])

# %%
fig = crosscheck_figures.marginals(check)
plt.show()

# %% [markdown]
# ### Would it notice a wrong solver?
#
# A check that cannot fail proves nothing. Shift $q$'s sensitivities by two
# posterior sd (a biased M-step would do that), or shrink its spread to half
# (a wrong information matrix), and recompute the statistics against the
# same NUTS draws with the harness's own `element_stats`:

# %%
sd_n = flat(nuts_sens).std(0, ddof=1)
shifted = q_sens + xr.DataArray(2 * sd_n, dims="rater", coords={"rater": q_sens["rater"]})
narrow = q_sens.mean(("chain", "draw")) + 0.5 * (q_sens - q_sens.mean(("chain", "draw")))
for label, q_bad in (("correct q", q_sens), ("shifted by 2 sd", shifted), ("half the spread", narrow)):
    st = crosscheck_stats.element_stats(q_bad, nuts_sens)
    print(f"{label:<16} max |z| {float(np.abs(st['zscore']).max()):.2f}, median sd ratio "
          f"{float(st['sd_ratio'].median()):.2f}, coverage of q's 90% interval {float(st['coverage'].mean()):.2f}")
rule = next(r for r in check.criteria.rules if r.variable == "sensitivity")
print("criterion:", rule.describe())
assert float(np.abs(crosscheck_stats.element_stats(shifted, nuts_sens)["zscore"]).min()) > rule.within_sd
assert float(crosscheck_stats.element_stats(narrow, nuts_sens)["sd_ratio"].median()) < rule.sd_ratio[0]

# %% [markdown]
# Both errors break the criterion (every interior sensitivity within 1 sd,
# median sd ratio in [0.67, 1.5]): the shifted $q$ on z, the narrow one on
# the sd ratio.
#
# ## 2. Simulation-based calibration
#
# The cross-check compares two posteriors on *one* data set. SBC asks
# whether the solver's posterior is right *on average over the prior*: draw
# $\theta^\star$ from the prior, data from the story given $\theta^\star$,
# fit, and record the PIT $u = $ share of $q$'s draws below $\theta^\star$.
# If $q$ is the posterior, $u$ is uniform over simulations (Talts et al.
# 2018; with a VB $q$: Yao et al. 2018). By hand first, with STAPLE and raters
# drawn from Beta(8, 2), for the Laplace $q$ and for a deliberately
# overconfident copy of it (half the spread):

# %%
config = staple.Config(sensitivity_prior=(8.0, 2.0), specificity_prior=(8.0, 2.0), prior="estimate")
rng = np.random.default_rng(SEED)
pits = {"Laplace q": [], "overconfident q": []}
t0 = time.perf_counter()
for sim in range(SBC_SIMS):
    true_sens, true_spec = rng.beta(8, 2, N_RATERS), rng.beta(8, 2, N_RATERS)
    sim_data, _ = staple.simulate(config, shape=SBC_SHAPE, n_raters=N_RATERS, random_seed=sim,
                                  sensitivity=true_sens, specificity=true_spec)
    fit = staple.fit(sim_data, config, progress=False)
    q = fit.posterior_draws(1000, random_seed=sim)["posterior"]["sensitivity"].values.reshape(-1, N_RATERS)
    over = q.mean(0) + 0.5 * (q - q.mean(0))
    pits["Laplace q"].append((q < true_sens).mean(0))
    pits["overconfident q"].append((over < true_sens).mean(0))
print(f"{SBC_SIMS} simulations in {time.perf_counter() - t0:.1f} s")
tails = {k: float(np.mean((np.array(v) < 0.05) | (np.array(v) > 0.95))) for k, v in pits.items()}
print("share of PITs outside [0.05, 0.95] (0.10 if uniform):", {k: round(v, 3) for k, v in tails.items()})

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
for ax, (label, values) in zip(axes, pits.items()):
    ax.hist(np.ravel(values), bins=10, range=(0, 1), color="C0" if label == "Laplace q" else "C3")
    ax.axhline(np.size(values) / 10, color="k", ls=":", lw=1)
    ax.set(title=f"{label}: PIT of the sensitivities", xlabel="PIT u")
axes[0].set_ylabel("count")
plt.tight_layout()
plt.show()
assert tails["overconfident q"] > tails["Laplace q"]

# %% [markdown]
# The overconfident $q$ piles the PITs at 0 and 1: its intervals are too
# short to contain the truth as often as they claim. The library's SBC
# (`bayesfuse check --sbc N`, here `crosscheck_sbc.run`) draws the truth from
# the PyMC model's own prior and tests uniformity with arviz-stats
# (`pot_c`), for every parameter, with an ECDF-difference plot and its
# simultaneous band:

# %%
sbc = crosscheck_sbc.run("staple", n_sims=SBC_SIMS, shape=SBC_SHAPE, n_raters=N_RATERS, random_seed=SEED)
print(sbc.verdict())
sbc.figure()
plt.show()

# %% [markdown]
# Read the verdict with the number of simulations in mind. When we ran this
# notebook, 40 simulations (small settings) did not reject uniformity, and
# 200 (full settings, 16 x 16 x 12 voxels) did: about 12 % of the PITs fell
# in the outer 10 %, evenly on both sides, so STAPLE's Laplace $q$ is a
# little too narrow on such small cases, where a sensitivity's posterior
# is not yet Gaussian. The cross-check of section 1 passed on its one data
# set; SBC, averaging over the prior, has the power to see it.

# %% [markdown]
# ## 3. What mean-field misses
#
# For EM the uncertainty comes from a Laplace approximation; the VB models
# (robust-t, gaussian, mixture) use a **factorised** $q$, which cannot
# represent posterior correlations between blocks. A model where this is
# visible and everything is exact: the Gaussian fusion with a flat prior on
# the consensus, a bias prior, and fixed noise (identity link, one
# coordinate):
#
# $$\tilde D_{pn} = \tilde T_n + b_p + \varepsilon_{pn},\quad
#   \varepsilon_{pn} \sim \mathcal N(0, \sigma_p^2),\quad b_p \sim \mathcal N(0, \beta^{-1}).$$
#
# Adding $c$ to every $\tilde T_n$ and subtracting it from every $b_p$ leaves
# the likelihood unchanged: only the bias prior pins that common shift, so
# the posterior of $(\tilde T, b)$ is strongly correlated along it. The
# posterior is Gaussian, so it is known in closed form.

# %%
sigma = np.array([0.10, 0.15, 0.20, 0.30])
beta = 1 / 0.3**2
rng = np.random.default_rng(SEED)
T_true = np.sin(np.linspace(0, 3, MF_VOXELS))
b_true = rng.normal(0, 1 / np.sqrt(beta), N_RATERS)
D_obs = T_true[None] + b_true[:, None] + sigma[:, None] * rng.standard_normal((N_RATERS, MF_VOXELS))

# the exact posterior: precision matrix and mean of (T~, b)
P_, N_ = N_RATERS, MF_VOXELS
w = 1 / sigma**2
precision = np.zeros((N_ + P_, N_ + P_))
precision[:N_, :N_] = np.eye(N_) * w.sum()
precision[N_:, N_:] = np.diag(N_ * w + beta)
precision[:N_, N_:] = np.broadcast_to(w, (N_, P_))
precision[N_:, :N_] = precision[:N_, N_:].T
cov_exact = np.linalg.inv(precision)
mean_exact = cov_exact @ np.concatenate([(w[:, None] * D_obs).sum(0), (w[:, None] * D_obs).sum(1)])
sd_exact = np.sqrt(np.diag(cov_exact))

# %% [markdown]
# Mean-field VB, $q(\tilde T)\,q(b)$: with one coordinate, (eq:qT) and
# (eq:qb) with $\tau = 1$ and a flat prior on $\tilde T$ are
#
# $$q(\tilde T_n) = \mathcal N\Big(\frac{\sum_p w_p (\tilde D_{pn} - \mu_{b,p})}{\sum_p w_p}, \frac{1}{\sum_p w_p}\Big),\qquad
#   q(b_p) = \mathcal N\Big(\frac{w_p \sum_n (\tilde D_{pn} - \mu_{T,n})}{\beta + N w_p}, \frac{1}{\beta + N w_p}\Big),$$
#
# with $w_p = 1/\sigma_p^2$: a few lines of NumPy. Each update is exact
# given the other block, so the iteration zig-zags along the correlated
# direction: count the sweeps. Then the library's own update functions
# (`G.update_q_T`, `rt.update_q_b`) must leave the converged state where it is.

# %%
mu_b = np.zeros(P_)
for sweep in range(1, 100_000):
    mu_T = (w[:, None] * (D_obs - mu_b[:, None])).sum(0) / w.sum()
    new_b = w * (D_obs - mu_T[None]).sum(1) / (beta + N_ * w)
    done = np.max(np.abs(new_b - mu_b)) < 1e-13
    mu_b = new_b
    if done:
        break
mf_mean = np.concatenate([mu_T, mu_b])
mf_sd = np.sqrt(np.concatenate([np.full(N_, 1 / w.sum()), 1 / (beta + N_ * w)]))
print(f"mean-field converged after {sweep} sweeps")

kd = G.from_coords(D_obs[..., None], G.link_space("identity", 2))  # one link coordinate
Sigma = sigma[:, None, None] ** 2
lib_T, _, lib_S_T = G.update_q_T(kd, np.ones(P_), Sigma, bias=mu_b[:, None], return_cov=True)
lib_b, lib_S_b = rt.update_q_b(kd.coords(), np.ones((P_, N_)), mu_T[None], Sigma, beta)
np.testing.assert_allclose(lib_T[0], mu_T, atol=1e-6)        # float32 storage of the maps in kd
np.testing.assert_allclose(lib_b[:, 0], mu_b, atol=1e-6)
np.testing.assert_allclose(np.sqrt(lib_S_T[:, 0, 0]), mf_sd[:N_], rtol=1e-12)
np.testing.assert_allclose(np.sqrt(lib_S_b[:, 0, 0]), mf_sd[N_:], rtol=1e-12)
print("the library's updates (eq:qT), (eq:qb) leave this state in place")
print(f"largest |mean_MF - mean_exact|: {np.abs(mf_mean - mean_exact).max():.1e}")
print(f"sd_MF / sd_exact: consensus {np.round(mf_sd[:N_] / sd_exact[:N_], 3)[:5]}..., biases {np.round(mf_sd[N_:] / sd_exact[N_:], 3)}")
np.testing.assert_allclose(mf_mean, mean_exact, atol=1e-7)
assert np.all(mf_sd < sd_exact)

# %% [markdown]
# The means are exact (for a Gaussian posterior, mean-field's fixed point
# has the right means), the standard deviations are all too small: $q$'s
# precision is the *diagonal* of the posterior precision, which ignores how
# much of each $\tilde T_n$'s uncertainty comes through the unknown common
# shift. NUTS on the same model, written in PyMC, confirms the exact
# posterior; and k-hat, with mean-field $q$ as the proposal, flags the
# problem without knowing the exact answer.

# %%
with pm.Model(coords={"voxel": np.arange(N_), "rater": np.arange(P_)}) as gauss:
    T = pm.Flat("T", dims="voxel")
    b = pm.Normal("b", 0, 1 / np.sqrt(beta), dims="rater")
    pm.Normal("D", mu=T[None, :] + b[:, None], sigma=sigma[:, None], observed=D_obs, dims=("rater", "voxel"))
    # a dense mass matrix: the posterior is strongly correlated along the common shift
    idata = pm.sample(draws=DRAWS, tune=DRAWS, chains=CHAINS, cores=1, nuts_sampler="pymc", random_seed=SEED,
                      progressbar=False, init="jitter+adapt_full", initvals={"T": D_obs.mean(0)})
nuts_draws = np.concatenate([flat(idata["posterior"]["T"]), flat(idata["posterior"]["b"])], axis=1)
print(f"sd_NUTS / sd_exact: {np.round(nuts_draws.std(0) / sd_exact, 2).min()}-{np.round(nuts_draws.std(0) / sd_exact, 2).max()}"
      f", max r_hat {float(az.rhat(idata)['T'].max()):.3f}")

q_draws = mf_mean + mf_sd * np.random.default_rng(SEED).standard_normal((4000, N_ + P_))
resid = q_draws - mean_exact
log_p = -0.5 * np.einsum("si,ij,sj->s", resid, precision, resid)
log_q = -0.5 * np.sum(((q_draws - mf_mean) / mf_sd) ** 2, axis=1)
khat = crosscheck_stats.pareto_khat(log_p - log_q)
print(f"PSIS k-hat of mean-field q against the posterior: {khat:.2f}")

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
axes[0].scatter(nuts_draws[:, 0], nuts_draws[:, N_], s=2, alpha=0.3, color="0.5", label="NUTS draws")
ang = np.linspace(0, 2 * np.pi, 200)
for cov2, colour, label in ((cov_exact[np.ix_([0, N_], [0, N_])], "k", "exact posterior (2 sd)"),
                            (np.diag([mf_sd[0] ** 2, mf_sd[N_] ** 2]), "C3", "mean-field q (2 sd)")):
    vals, vecs = np.linalg.eigh(cov2)
    ell = vecs @ (2 * np.sqrt(vals)[:, None] * np.stack([np.cos(ang), np.sin(ang)]))
    axes[0].plot(mean_exact[0] + ell[0], mean_exact[N_] + ell[1], color=colour, label=label)
axes[0].set(xlabel="consensus T~ at voxel 0", ylabel="bias of rater 0", title="a correlated posterior, a factorised q")
axes[0].legend(fontsize=8)
axes[1].bar(np.arange(N_ + P_), mf_sd / sd_exact, color=["C0"] * N_ + ["C1"] * P_)
axes[1].axhline(1, color="k", ls=":", lw=1)
axes[1].set(xlabel="T~ (blue: voxels), b (orange: raters)", ylabel="sd_q / sd_posterior",
            title=f"mean-field is overconfident (k-hat {khat:.2f})")
plt.tight_layout()
plt.show()
assert khat > 0.7, "k-hat should flag the overconfident q"
assert np.all(np.abs(nuts_draws.std(0) / sd_exact - 1) < 0.2)
assert float(az.rhat(idata)["T"].max()) < 1.02

# %% [markdown]
# ## What to take away
#
# - The cross-check compares the solver with NUTS on the *same* posterior
#   (hyperparameters pinned) and claims nothing when NUTS is unhealthy. Its
#   z-scores and sd ratios are simple statistics, and they fail for a
#   shifted or a too-narrow $q$.
# - SBC checks the solver over the whole prior: PITs piled at 0 and 1 mean
#   overconfidence.
# - Mean-field VB gets Gaussian means right and variances too small wherever
#   blocks are correlated: here the consensus and the biases, through their
#   common shift. k-hat > 0.7 flags it. In the library's `gaussian` model
#   (bias *and* spatial priors) the same effect shows in its calibration on
#   its own story (the card's calibration figure: the 90 % intervals cover
#   less than 90 %). Read the VB models' per-voxel intervals with that in
#   mind, and see each card's cross-check section for the measured ratios.
