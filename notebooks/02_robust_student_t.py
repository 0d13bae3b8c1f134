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
# # Robust Student-t fusion
#
# The model of seed 000 (section 2 and supplement 1.1), restated in
# [`models/robust_t.md`](../models/robust_t.md): each rater's map is the
# consensus plus a bias plus noise whose scale changes **locally**, so that a
# rater who is wrong in one region is down-weighted there and only there.
#
# This notebook:
#
# 1. states the generative story and draws data from it;
# 2. runs the mean-field VB updates **one block at a time** with the
#    library's pure update functions, with the ELBO after every block (it
#    never goes down), and writes two of them by hand;
# 3. checks that the library's fast solver converges to a fixed point of
#    every update as the card writes it;
# 4. shows **tau maps**: where each rater is locally unreliable, on a
#    phantom with an outlier rater;
# 5. shows **what the spatial prior does**: denoising, the choice of basis
#    spacing, and how the estimated hyperparameters switch a prior off that
#    does not fit.
#
# Set `BAYESFUSE_NOTEBOOK_SMALL=1` for small settings (the test suite does).

# %% tags=["parameters"]
import os

SMALL = os.environ.get("BAYESFUSE_NOTEBOOK_SMALL", "0") == "1"
SIM_SHAPE = (16, 16) if SMALL else (32, 32)          # data drawn from the model (part 2-3)
FIXED_POINT_TOL = 1e-5 if SMALL else 1e-8            # relative ELBO change at which the solver stops
PHANTOM_SIZE = 28 if SMALL else 96                   # outlier phantom (part 4), pixels per side
SPATIAL_SHAPE = (20, 20) if SMALL else (48, 48)      # spatial-prior study (part 5)
SPACINGS = (4, 8) if SMALL else (2, 4, 8, 16)        # basis spacings tried, in voxels
SPATIAL_ITER, SPATIAL_TOL = (60, 1e-5) if SMALL else (400, 1e-6)
N_RATERS = 5
SEED = 3

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from scipy import special

import bayesfuse
from bayesfuse import gaussian as G
from bayesfuse import phantoms, spatial
from bayesfuse.models import robust_t as rt

# %% [markdown]
# ## 1. The generative story
#
# A link $F$ maps a probability vector to $\mathbb{R}^K$; the default is
# the square root, $F(p) = \sqrt{p}$, which ties the Gaussian likelihood to
# the Hellinger distance between maps. Write $\tilde D_{pn} = F(D_{pn})$
# for rater $p$'s map at voxel $n$ and $\tilde T_n$ for the consensus.
#
# $$\tau_{np} \sim \text{Gamma}(\nu_p/2, \nu_p/2),\qquad
#   \tilde D_{pn} \mid \tilde T_n, b_p, \tau_{np} \sim
#   \mathcal N(\tilde T_n + b_p,\; \Sigma_p / \tau_{np}),$$
# $$b_p \sim \mathcal N(0, \beta^{-1} I),\qquad
#   \tilde T_n \mid W \sim \mathcal N(W \Phi_n, \Sigma_T I),\qquad
#   W_k \sim \mathcal N(0, \alpha^{-1} I).$$
#
# $\tau_{np}$ is rater $p$'s **local reliability** at voxel $n$: a small
# $\tau$ inflates the noise there. Integrating $\tau$ out gives a
# multivariate Student-t with $\nu_p$ degrees of freedom (heavy tails:
# outliers are expected, not fatal). $\Phi_n$ are Gaussian bases on a grid
# (the spatial prior). As a graphical model:
#
# ```
#   alpha ──► W ──► T~_n ◄── Sigma_T            beta ──► b_p
#                    │                                    │
#                    ▼                                    ▼
#   nu_p ──► tau_np ──────────────────────►  D~_pn  ◄─────┘
#                                              ▲
#                          Sigma_p ────────────┘
#          [voxels n = 1..N]   [raters p = 1..P]
# ```
#
# `rt.simulate` draws from exactly this story; its raters have
# $\nu = 2.5, 4, 8, 30, 2.5$: from very heavy-tailed to nearly Gaussian.

# %%
config = rt.Config()  # Student-t, sqrt link, bias prior, spatial prior (bases every 4 voxels)
data, truth = rt.simulate(config, shape=SIM_SHAPE, n_raters=N_RATERS, random_seed=SEED)
space = G.link_space("sqrt", 2)
kd = G.from_coords(truth["coords"], space)  # the solver's storage of the link coordinates (float32)
Dt = kd.coords()                             # D~ as stored, (P, N, D) in float64: by hand and library see the same numbers
P, N, D = Dt.shape
print(f"P = {P} raters, N = {N} voxels, D = {D} link coordinates; true nu = {truth['nu']}")

fig, axes = plt.subplots(2, P + 1, figsize=(2.3 * (P + 1), 4.8))
axes[0, 0].imshow(truth["probability"][..., 1], cmap="magma", vmin=0, vmax=1)
axes[0, 0].set_title("truth F^-1(T~)")
axes[1, 0].axis("off")
for p in range(P):
    axes[0, p + 1].imshow(data.maps.values[p], cmap="magma", vmin=0, vmax=1)
    axes[0, p + 1].set_title(f"rater {p}, nu = {truth['nu'][p]:g}")
    axes[1, p + 1].imshow(truth["tau"][p].reshape(SIM_SHAPE), cmap="viridis", vmin=0, vmax=2.5)
    axes[1, p + 1].set_title("its drawn tau")
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The VB updates, one block at a time
#
# Mean-field VB approximates the posterior by $q(\tilde T)\, q(b)\, q(\tau)\,
# q(W)$ and takes point estimates of $\beta, \Sigma_p, \nu_p, \alpha,
# \Sigma_T$. Each block update maximises the ELBO in its block with the
# others fixed (the card derives each one), so **no block update can lower
# the ELBO**. Two of them, written by hand and checked against the library:
#
# **q(tau)** (eq:qtau): $q(\tau_{np}) = \text{Gamma}(a_p, c_{np})$ with
# $a_p = (\nu_p + D)/2$ and
# $c_{np} = \nu_p/2 + \tfrac12[e^\top \Sigma_p^{-1} e + \operatorname{tr}(\Sigma_p^{-1} S_{b,p}) + \operatorname{tr}(\Sigma_p^{-1} S_{T,n})]$,
# $e = \tilde D_{pn} - \mu_{T,n} - \mu_{b,p}$. The expected squared residual,
# not just the residual at the means: the uncertainty of $\tilde T$ and $b$
# counts as misfit.
#
# **q(T~)** (eq:qT): $S_{T,n} = (\sum_p \hat\tau_{np} \Sigma_p^{-1} + \Sigma_T^{-1} I)^{-1}$,
# $\mu_{T,n} = S_{T,n}(\sum_p \hat\tau_{np}\Sigma_p^{-1}(\tilde D_{pn} - \mu_{b,p}) + \Sigma_T^{-1} \mu_W \Phi_n)$:
# a precision-weighted average of the raters, each weighted by its local
# reliability $\hat\tau = E[\tau]$, pulled towards the smooth prior mean.

# %%
def q_tau_by_hand(Dt, mu_T, S_T, mu_b, S_b, Sigma, nu):
    Sinv = np.linalg.inv(Sigma)
    e = Dt - mu_T.T[None] - mu_b[:, None]
    quad = np.einsum("pni,pij,pnj->pn", e, Sinv, e)
    spread = np.einsum("pij,nji->pn", Sinv, S_T) + np.einsum("pij,pji->p", Sinv, S_b)[:, None]
    return (nu + D) / 2, nu[:, None] / 2 + 0.5 * (quad + spread)


def q_T_by_hand(Dt, tau, Sigma, mu_b, sigma_T, prior_mean):
    Sinv = np.linalg.inv(Sigma)
    precision = np.einsum("pn,pij->nij", tau, Sinv) + np.eye(D) / sigma_T
    S_T = np.linalg.inv(precision)
    pull = np.einsum("pn,pij,pnj->ni", tau, Sinv, Dt - mu_b[:, None]) + prior_mean.T / sigma_T
    return np.einsum("nij,nj->in", S_T, pull), S_T


# %% [markdown]
# Now the loop. It starts where the library starts (the raters' mean, a
# covariance from the spread around it) and runs every update in turn,
# recording the ELBO (written out term by term in `rt.elbo_reference`, eq:elbo)
# after each one. The bases: `spatial.KroneckerBasis`, made dense here
# because the grid is tiny.

# %%
prob = rt.make_problem(kd, config, SIM_SHAPE)
Phi = prob.basis.dense()                     # (N, L)
L = Phi.shape[1]
start = rt._init_state(prob, config, np.float64)
mu_T, Sigma, nu = start.mu_T.copy(), start.Sigma.copy(), start.nu.copy()
beta, alpha, sigma_T = start.beta, start.alpha, start.sigma_T
# q(b) and q(W) start at their priors: proper distributions, so the ELBO is finite from the first block on
mu_b, S_b = np.zeros((P, D)), np.repeat(np.eye(D)[None] / beta, P, 0)
mu_W, S_W = np.zeros((D, L)), np.eye(L) / alpha
tau = np.ones((P, N))


def elbo():
    q = {"mu_T": mu_T, "S_T": S_T, "mu_b": mu_b, "S_b": S_b, "a": np.repeat(a[:, None], N, 1), "c": c,
         "mu_W": mu_W, "S_W": S_W}
    return rt.elbo_reference(Dt, q, {"Sigma": Sigma, "nu": nu, "beta": beta, "alpha": alpha, "sigma_T": sigma_T},
                             config, Phi)


steps = []  # (block, ELBO after it)
for iteration in range(6):
    # q(T~) first: the start has no S_T yet
    mu_T, S_T = q_T_by_hand(Dt, tau, Sigma, mu_b, sigma_T, mu_W @ Phi.T)
    lib_mu_T, _, lib_S_T = G.update_q_T(kd, tau, Sigma, bias=mu_b, prior_var=sigma_T, prior_mean=mu_W @ Phi.T,
                                        return_cov=True)
    np.testing.assert_allclose(mu_T, lib_mu_T, atol=1e-10)
    np.testing.assert_allclose(S_T, lib_S_T, atol=1e-12)
    a, c = q_tau_by_hand(Dt, mu_T, S_T, mu_b, S_b, Sigma, nu)
    np.testing.assert_allclose(c, rt.update_q_tau(Dt, mu_T, S_T, mu_b, S_b, Sigma, nu)[1], rtol=1e-10)
    tau = a[:, None] / c
    steps.append(("q(tau)", elbo()))
    mu_T, S_T = q_T_by_hand(Dt, tau, Sigma, mu_b, sigma_T, mu_W @ Phi.T)
    steps.append(("q(T~)", elbo()))
    mu_b, S_b = rt.update_q_b(Dt, tau, mu_T, Sigma, beta)                        # (eq:qb)
    steps.append(("q(b)", elbo()))
    S_W = np.linalg.inv(Phi.T @ Phi / sigma_T + alpha * np.eye(L))               # (eq:rt-qW), dense
    mu_W = (S_W @ Phi.T @ mu_T.T / sigma_T).T
    steps.append(("q(W)", elbo()))
    beta = rt.update_beta(mu_b, S_b)                                             # (eq:beta)
    steps.append(("beta", elbo()))
    Sigma = G.covariance_m_step(kd, tau, mu_T, S_T, mu_b, S_b, config.variance_floor)  # (eq:sigma-p)
    steps.append(("Sigma_p", elbo()))
    e_log_tau = special.digamma(a)[:, None] - np.log(c)
    nu = rt.update_nu((e_log_tau - tau).sum(1), N, config.nu_bounds)             # (eq:nu)
    steps.append(("nu_p", elbo()))
    alpha = L * D / (D * np.trace(S_W) + np.sum(mu_W**2))                        # (eq:alpha)
    steps.append(("alpha", elbo()))
    spread = np.einsum("nl,lm,nm->n", Phi, S_W, Phi)
    sigma_T = np.sum((mu_T - mu_W @ Phi.T) ** 2 + np.diagonal(S_T, axis1=1, axis2=2).T + spread) / (N * D)  # (eq:sigma-T)
    steps.append(("Sigma_T", elbo()))

values = np.array([v for _, v in steps])
changes = np.diff(values)
worst = int(np.argmin(changes))
print(f"ELBO after 6 rounds: {values[-1]:.3f}; smallest change of any block: {changes[worst]:.2e} ({steps[worst + 1][0]})")
assert changes.min() > -1e-8 * np.abs(values).max(), "a block update lowered the ELBO"

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
axes[0].plot(values, "-", color="0.6", lw=1)
for name in dict.fromkeys(n for n, _ in steps):
    idx = [i for i, (n, _) in enumerate(steps) if n == name]
    axes[0].plot(idx, values[idx], "o", ms=4, label=name)
axes[0].set(xlabel="block update", ylabel="ELBO", title="every block update raises the ELBO")
axes[0].legend(ncol=3, fontsize=8)
# changes[j] is the gain of block update j + 1; show rounds 2-6 (round 1's gains dwarf the rest)
axes[1].bar(np.arange(10, changes.size + 1), changes[9:], color="C0")
axes[1].set_yscale("symlog", linthresh=1e-6)
axes[1].set(xlabel="block update (rounds 2-6)", ylabel="ELBO gain", title="gain of each block update (never < 0)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The library's solver is a fixed point of every update
#
# `rt.fit` (and `rt.solve` on link coordinates, used here because the data
# were drawn in link space) does not call these functions one by one: one
# fused pass over the voxels updates $q(\tau)$ and $q(\tilde T)$ voxel by
# voxel and accumulates the sums every global update needs. If its updates
# are the card's, its converged state must be a fixed point of each of them.
# We run it until the relative ELBO change is below `FIXED_POINT_TOL`, then
# apply each update once more and measure how far it moves.

# %%
t0 = time.perf_counter()
state, converged, reason = rt.solve(prob, config, max_iter=5000, tol=FIXED_POINT_TOL, progress=False)
print(f"{len(state.elbo)} iterations, {time.perf_counter() - t0:.1f} s: {reason}")
q = rt.dense_q(prob, state, config)
h = rt.hyper_of(state)
tau_hat = q["a"] / q["c"]
print(f"ELBO: solver {state.elbo[-1]:.6f}, written-out reference {rt.elbo_reference(Dt, q, h, config, Phi):.6f}")


def moved(new, old):
    """Largest change relative to the size of the quantity."""
    return float(np.max(np.abs(np.asarray(new) - old)) / max(np.max(np.abs(old)), 1e-300))


a_new, c_new = rt.update_q_tau(Dt, q["mu_T"], q["S_T"], q["mu_b"], q["S_b"], h["Sigma"], h["nu"])
mu_T_new, _ = q_T_by_hand(Dt, tau_hat, h["Sigma"], q["mu_b"], h["sigma_T"], q["mu_W"] @ Phi.T)
mu_b_new, _ = rt.update_q_b(Dt, tau_hat, q["mu_T"], h["Sigma"], h["beta"])
S_W_new = np.linalg.inv(Phi.T @ Phi / h["sigma_T"] + h["alpha"] * np.eye(L))
e_log_tau = special.digamma(q["a"]) - np.log(q["c"])
moves = {
    "q(tau): E[tau]": moved(a_new[:, None] / c_new, tau_hat),
    "q(T~): mu_T": moved(mu_T_new, q["mu_T"]),
    "q(b): mu_b": moved(mu_b_new, q["mu_b"]),
    "q(W): mu_W": moved((S_W_new @ Phi.T @ q["mu_T"].T / h["sigma_T"]).T, q["mu_W"]),
    "beta": moved(rt.update_beta(q["mu_b"], q["S_b"]), h["beta"]),
    "Sigma_p": moved(G.covariance_m_step(kd, tau_hat, q["mu_T"], q["S_T"], q["mu_b"], q["S_b"], config.variance_floor),
                     h["Sigma"]),
    "nu_p": moved(rt.update_nu((e_log_tau - tau_hat).sum(1), N, config.nu_bounds), h["nu"]),
    "alpha": moved(L * D / (D * np.trace(q["S_W"]) + np.sum(q["mu_W"] ** 2)), h["alpha"]),
}
for name, m in moves.items():
    print(f"  one more {name:<16} moves it by {m:.1e} (relative)")
assert max(moves.values()) < 1e-2, "the solver's answer is not a fixed point of the card's updates"
print(f"estimated nu: {np.round(state.nu, 1)}   true: {truth['nu']}")

# %% [markdown]
# The estimated $\nu$ follow the truth's order, and the nearly Gaussian
# rater gets a large $\nu$. Its $\nu$ is also what converges most slowly: the
# ELBO is almost flat in $\nu$ once $\nu$ is large (a Student-t with
# $\nu = 50$ or $150$ looks the same), which is why VB needs hundreds of
# iterations for a tolerance of $10^{-8}$.
#
# ## 4. Tau maps: where a rater is wrong
#
# A phantom with five raters, one of which (the "outlier") adds a blob that
# is not in the truth (`phantoms.make_phantom(..., outlier=True)`). The
# maps are sigmoids of signed distances: away from the border every rater
# is 0 or 1. We fuse with the plain mean, the Gaussian model ($\tau = 1$)
# and the robust model.

# %%
ph = phantoms.make_phantom("probability", ndim=2, shape=(PHANTOM_SIZE, PHANTOM_SIZE), n_raters=N_RATERS,
                           random_seed=7, outlier=True, spacing=128 / PHANTOM_SIZE)
outlier, region, true_mask = ph.params["outlier_rater"], ph.outlier_region, ph.truth > 0
fits = {}
for method in ("mean", "gaussian", "robust-t"):
    t0 = time.perf_counter()
    fits[method] = bayesfuse.fuse(ph.raters, method, progress=False)
    print(f"{method:<9} {time.perf_counter() - t0:5.1f} s")
tau_maps = fits["robust-t"].tree["maps"]["tau"].values        # (rater, x, y): E[tau]
print(fits["robust-t"].raters[["nu", "mean_tau", "sd"]].round(3))

leak = {m: float(np.abs(f.probability.values[..., 1] - true_mask)[region].mean()) for m, f in fits.items()}
print("mean |consensus - truth| inside the outlier's blob:", {m: round(v, 3) for m, v in leak.items()})
print(f"outlier's E[tau]: {tau_maps[outlier][region].mean():.2f} inside its blob, "
      f"{tau_maps[outlier][~region].mean():.2f} elsewhere")

# %%
fig, axes = plt.subplots(3, N_RATERS, figsize=(2.5 * N_RATERS, 7.5))
for p in range(N_RATERS):
    axes[0, p].imshow(ph.raters.maps.values[p], cmap="magma", vmin=0, vmax=1)
    axes[0, p].set_title(f"rater {p}" + (" (outlier)" if p == outlier else ""))
    im = axes[1, p].imshow(tau_maps[p], cmap="viridis", vmin=0, vmax=np.quantile(tau_maps, 0.99))
    axes[1, p].contour(region, levels=[0.5], colors="w", linewidths=0.7)
    axes[1, p].set_title("E[tau]")
for j, method in enumerate(("mean", "gaussian", "robust-t")):
    axes[2, j].imshow(fits[method].probability.values[..., 1], cmap="magma", vmin=0, vmax=1)
    axes[2, j].contour(true_mask, levels=[0.5], colors="cyan", linewidths=0.7)
    axes[2, j].set_title(f"{method}: error in blob {leak[method]:.3f}", fontsize=9)
sd_map = fits["robust-t"].tree["maps"]["consensus_sd"].values
axes[2, 3].imshow(sd_map, cmap="viridis")
axes[2, 3].set_title("robust-t: posterior sd")
axes[2, 4].axis("off")
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
plt.colorbar(im, ax=axes[1, :].tolist(), fraction=0.015)
plt.show()
assert tau_maps[outlier][region].mean() < 0.5 * tau_maps[outlier][~region].mean(), "tau does not flag the outlier"
assert leak["robust-t"] < leak["mean"], "the outlier leaks into the robust consensus as much as into the mean"

# %% [markdown]
# The outlier's $E[\tau]$ drops inside its blob (white contour): the model
# has found *where* the rater departs, without being told. Every rater's
# $E[\tau]$ is also low along its own border: that is where the raters'
# soft edges disagree, and the model reads each rater's local departure
# from the others as lower reliability there.
# The mean gives that rater a fifth of the vote everywhere; the Gaussian
# model can only down-weight it globally (a larger $\Sigma_p$); the robust
# model down-weights it locally.
#
# Note the estimated $\nu$: all small. Away from the border every rater
# says exactly 0 or 1, so the residuals are exactly zero on most voxels and
# large on a few: a very heavy-tailed picture. The covariance floor
# `min_variance` keeps $\Sigma_p$ from collapsing onto those ties (the card,
# "Ties and the variance floor").
#
# ## 5. What the spatial prior does
#
# $\tilde T_n \sim \mathcal N(W\Phi_n, \Sigma_T I)$ says that the consensus is
# close to a smooth field spanned by Gaussian bases; their spacing and width
# set how smooth. Here are the 1-D bases for two spacings (the 2-D/3-D bases
# are their products):

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 2.8), sharey=True)
for ax, spacing in zip(axes, (4, 8)):
    Phi_1d, centres = spatial.basis_1d(SPATIAL_SHAPE[0], spacing)
    ax.plot(Phi_1d)
    ax.set(title=f"basis spacing {spacing} voxels: {Phi_1d.shape[1]} bases", xlabel="voxel")
plt.tight_layout()
plt.show()

# %% [markdown]
# Data from the model with noisy raters (per-rater sd 0.12 in link units,
# bases every 4 voxels in the simulation). We fit without the spatial prior
# and with several basis spacings, and measure the error of the consensus
# against the true $\tilde T$.

# %%
sim_cov = np.broadcast_to(np.eye(2) * 0.12**2, (N_RATERS, 2, 2)).copy()
noisy, noisy_truth = rt.simulate(config, shape=SPATIAL_SHAPE, n_raters=N_RATERS, random_seed=11,
                                 hyper={"Sigma": sim_cov})
kd_noisy = G.from_coords(noisy_truth["coords"], space)
runs = {}
for spacing in (None, *SPACINGS):
    cfg = rt.Config(spatial_prior=spacing is not None, basis_spacing=spacing or 4.0)
    t0 = time.perf_counter()
    st, _, _ = rt.solve(rt.make_problem(kd_noisy, cfg, SPATIAL_SHAPE), cfg, max_iter=SPATIAL_ITER, tol=SPATIAL_TOL,
                        progress=False)
    rmse = float(np.sqrt(np.mean((st.mu_T - noisy_truth["T"]) ** 2)))
    runs[spacing] = (st, rmse)
    label = "no spatial prior" if spacing is None else f"spacing {spacing}"
    hyper = "" if spacing is None else f"; alpha {st.alpha:.3g}, Sigma_T {st.sigma_T:.3g}"
    print(f"{label:<17} RMSE vs truth {rmse:.4f} ({len(st.elbo)} iterations, {time.perf_counter() - t0:.1f} s{hyper})")

# %%
fig, axes = plt.subplots(1, len(runs) + 1, figsize=(2.7 * (len(runs) + 1), 3.2))
axes[0].imshow(noisy_truth["probability"][..., 1], cmap="magma", vmin=0, vmax=1)
axes[0].set_title("truth")
for ax, (spacing, (st, rmse)) in zip(axes[1:], runs.items()):
    ax.imshow(space.inverse(st.mu_T.T)[:, 1].reshape(SPATIAL_SHAPE), cmap="magma", vmin=0, vmax=1)
    ax.set_title(("flat prior" if spacing is None else f"spacing {spacing}") + f"\nRMSE {rmse:.3f}", fontsize=9)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()
best = min(runs, key=lambda s: runs[s][1])
assert best is not None and runs[best][1] < runs[None][1], "the spatial prior should reduce the error here"

# %% [markdown]
# - Without the prior the consensus is the reliability-weighted average of
#   the raters at each voxel: all their noise that does not cancel stays.
# - Bases at the simulation's own scale remove most of it.
# - Bases that are too coarse cannot follow the structure; rather than
#   forcing a blurred consensus, VB raises $\Sigma_T$ (the allowed distance
#   from the smooth field) until the prior has almost no say: the estimated
#   hyperparameters turn off a prior the data contradict. Look at $\Sigma_T$
#   in the printout above.
#
# `bayesfuse fuse --method robust-t -o basis_spacing=...` sets the spacing
# (`basis_units=mm` for millimetres).
#
# Next: [03_mixture_of_consensuses.py](03_mixture_of_consensuses.py), when the
# raters do not agree on one truth at all.
