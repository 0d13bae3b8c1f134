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
# # From STAPLE to soft-STAPLE
#
# Several raters have outlined the same structure. STAPLE (Warfield, Zou and
# Wells, 2004) estimates the hidden true segmentation together with each
# rater's sensitivity and specificity by EM. Soft-STAPLE (seed 001, Kats et
# al. 2019) lets each rater give a *probability* instead of a hard label.
#
# This notebook goes step by step:
#
# 1. the generative story of STAPLE, and data drawn from it;
# 2. EM written by hand in a few lines of NumPy, shown to agree with
#    `bayesfuse` to machine precision;
# 3. soft labels: the objective $L_\text{soft}$, and **the M-step question**:
#    the paper says "the M-step remains the same". Read literally, that update
#    is *not* a stationary point of $L_\text{soft}$; the derived one is;
# 4. the simplified soft-STAPLE, briefly;
# 5. the same models in PyMC, their log density checked against the EM
#    objective, and NUTS against EM.
#
# The derivations are in the model cards
# [`models/staple.md`](../models/staple.md) and
# [`models/soft_staple.md`](../models/soft_staple.md); the equation labels
# below, such as (eq:staple-estep), are theirs.
#
# Run it with small settings (what the test suite does) by setting the
# environment variable `BAYESFUSE_NOTEBOOK_SMALL=1`.

# %% tags=["parameters"]
import os

SMALL = os.environ.get("BAYESFUSE_NOTEBOOK_SMALL", "0") == "1"
SHAPE = (16, 16, 16) if SMALL else (48, 48, 48)  # voxels of the simulated volumes
N_RATERS = 4                                       # exact soft-STAPLE sums over 2^P reports
NUTS_DRAWS = 300 if SMALL else 1000                # per chain, after as many tuning steps
NUTS_CHAINS = 2 if SMALL else 4
SEED = 2019

# %%
import itertools

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

import bayesfuse
from bayesfuse import phantoms
from bayesfuse.models import soft_staple as ss
from bayesfuse.models import staple

mid = SHAPE[2] // 2  # the slice the figures show

# %% [markdown]
# ## 1. The generative story
#
# Each voxel $t = 1..N$ has a hidden true label $x_t \in \{0, 1\}$ with
# prior $p(x_t = 1) = \pi_1$. Rater $i$ reports $y_{it}$, independently of
# the other raters given $x_t$:
#
# $$p(y_{it} = 1 \mid x_t = 1) = \theta_{i1} \;\text{(sensitivity)},\qquad
#   p(y_{it} = 0 \mid x_t = 0) = \theta_{i0} \;\text{(specificity)}.$$
#
# As a graphical model (plates in brackets):
#
# ```
#   pi ──► x_t ──► y_it ◄── (theta_i1, theta_i0)
#         [voxels t = 1..N]      [raters i = 1..P]
# ```
#
# so $p(y_t, x_t = a \mid \theta) = \pi_a \prod_i \theta[i, a, y_{it}]$
# (eq:staple-model). `staple.simulate` draws data from exactly this story:
# a ball as the truth, independent voxel-wise errors.

# %%
true_sens = np.array([0.90, 0.80, 0.70, 0.95])
true_spec = np.array([0.95, 0.90, 0.97, 0.85])
data, truth = staple.simulate(shape=SHAPE, n_raters=N_RATERS, random_seed=SEED,
                              sensitivity=true_sens, specificity=true_spec)
Y = data.binary().reshape(N_RATERS, -1).astype(float)  # (P, N): rater i's label of voxel t
x_true = truth["truth"].ravel()
print(f"{N_RATERS} raters, {Y.shape[1]} voxels, {x_true.mean():.1%} of them foreground")

fig, axes = plt.subplots(1, N_RATERS + 1, figsize=(2.4 * (N_RATERS + 1), 2.6))
axes[0].imshow(truth["truth"][:, :, mid], cmap="gray")
axes[0].set_title("truth")
for i in range(N_RATERS):
    axes[i + 1].imshow(data.binary()[i, :, :, mid], cmap="gray")
    axes[i + 1].set_title(f"rater {i}\nse {true_sens[i]:.2f}, sp {true_spec[i]:.2f}")
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. EM by hand
#
# The log-likelihood sums over the unknown label, $L(\theta) = \sum_t \log
# \sum_a \pi_a \prod_i \theta[i, a, y_{it}]$ (eq:staple-objective, flat
# priors). EM alternates two steps.
#
# **E-step** (eq:staple-estep): the posterior of the label by Bayes' rule,
#
# $$w_t(1) = \frac{\pi_1 \prod_i \theta_{i1}^{y_{it}} (1-\theta_{i1})^{1-y_{it}}}
#   {\pi_1 \prod_i \theta_{i1}^{y_{it}} (1-\theta_{i1})^{1-y_{it}}
#    + \pi_0 \prod_i (1-\theta_{i0})^{y_{it}} \theta_{i0}^{1-y_{it}}},$$
#
# computed in log space (with a hundred raters the products underflow).
#
# **M-step** (eq:staple-mstep): with $w$ fixed, maximise
# $\sum_t \sum_a w_t(a) \sum_i \log \theta[i, a, y_{it}]$. For one rater and
# $a = 1$ the terms are $\sum_t w_t(1) [y_{it} \log\theta_{i1} + (1-y_{it})
# \log(1-\theta_{i1})]$; setting the derivative to zero gives
#
# $$\theta_{i1} = \frac{\sum_t w_t(1)\, y_{it}}{\sum_t w_t(1)},\qquad
#   \theta_{i0} = \frac{\sum_t w_t(0)\,(1-y_{it})}{\sum_t w_t(0)}.$$
#
# The start is ITK's (eq:staple-init): the first posterior is the vote
# fraction, and the loop begins with an M-step. The prior $\pi_1$ is fixed
# to the raters' mean foreground fraction (eq:staple-prior-raters), as ITK
# does.

# %%
def e_step_by_hand(Y, sens, spec, pi1):
    """Posterior w_t(1) for every voxel, and the log-likelihood L."""
    log1 = np.log(pi1) + (Y * np.log(sens)[:, None] + (1 - Y) * np.log1p(-sens)[:, None]).sum(0)
    log0 = np.log1p(-pi1) + (Y * np.log1p(-spec)[:, None] + (1 - Y) * np.log(spec)[:, None]).sum(0)
    log_evidence = np.logaddexp(log0, log1)
    return np.exp(log1 - log_evidence), log_evidence.sum()


def m_step_by_hand(Y, w1):
    return (Y @ w1) / w1.sum(), ((1 - Y) @ (1 - w1)) / (1 - w1).sum()


pi1 = Y.mean()          # ITK's prior: the raters' mean foreground fraction
w1 = Y.mean(axis=0)     # ITK's start: the vote fraction
trace = []
for iteration in range(1000):
    sens, spec = m_step_by_hand(Y, w1)
    w1, loglik = e_step_by_hand(Y, sens, spec, pi1)
    trace.append(loglik)
    if iteration and abs(trace[-1] - trace[-2]) <= 1e-12 * abs(trace[-1]):
        break
trace = np.array(trace)
print(f"converged after {trace.size} E-steps; L = {trace[-1]:.6f}")
print("sensitivity by hand:", sens.round(4), " true:", true_sens)
print("specificity by hand:", spec.round(4), " true:", true_spec)

# %% [markdown]
# Now the library. `bayesfuse.fuse(data, "staple")` runs the same EM with
# the same start, prior and stopping rule (relative change of $L$ below
# $10^{-12}$). The two must agree to rounding.

# %%
result = bayesfuse.fuse(data, "staple", progress=False)
lib_sens = result.raters["sensitivity"].values
lib_spec = result.raters["specificity"].values
lib_w1 = result.probability.values[..., 1].ravel()
print(result.raters[["sensitivity", "specificity"]])

np.testing.assert_allclose(sens, lib_sens, atol=1e-10)
np.testing.assert_allclose(spec, lib_spec, atol=1e-10)
np.testing.assert_allclose(trace, result.objective, rtol=1e-10)
np.testing.assert_allclose(w1, lib_w1, atol=1e-6)  # the library stores the map as float32
print("by hand == bayesfuse: sensitivities, specificities, the objective at every iteration, the consensus")

# %% [markdown]
# ### Why the library never touches the voxels during EM
#
# Every update above depends on a voxel only through its **pattern**, the
# vector of the $P$ raters' labels. With $P = 4$ binary raters there are at
# most $2^4 = 16$ patterns, however many voxels there are; sums over voxels
# become count-weighted sums over patterns (eq:staple-patterns). The
# library's update functions work on that table. Here is its E-step on the
# patterns, next to our per-voxel posterior:

# %%
codes = (Y.astype(int) * (2 ** np.arange(N_RATERS))[:, None]).sum(0)  # pattern code of each voxel
patterns, counts = np.unique(codes, return_counts=True)
values = (patterns[None, :] >> np.arange(N_RATERS)[:, None]) & 1       # (P, n): labels of each pattern
theta = np.stack([np.stack([lib_spec, 1 - lib_spec], -1), np.stack([1 - lib_sens, lib_sens], -1)], axis=1)
resp, log_marginal = staple.e_step(values, theta, np.array([1 - pi1, pi1]))
print(f"{Y.shape[1]} voxels, {patterns.size} distinct patterns")

w_by_pattern = dict(zip(patterns, resp[:, 1]))
np.testing.assert_allclose(lib_w1, [w_by_pattern[c] for c in codes], atol=1e-6)
np.testing.assert_allclose(counts @ log_marginal, result.objective[-1], rtol=1e-12)
print("staple.e_step on 16 patterns == the per-voxel E-step on", Y.shape[1], "voxels")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
axes[0].plot(np.arange(1, trace.size + 1), trace, "o-", ms=3)
axes[0].set(xlabel="E-step", ylabel="log-likelihood L", title="EM never decreases L")
axes[1].imshow(lib_w1.reshape(SHAPE)[:, :, mid], cmap="magma", vmin=0, vmax=1)
axes[1].contour(truth["truth"][:, :, mid], levels=[0.5], colors="cyan", linewidths=0.8)
axes[1].set_title("consensus w_t(1), truth in cyan")
axes[1].axis("off")
axes[2].plot(true_sens, lib_sens, "o", label="sensitivity")
axes[2].plot(true_spec, lib_spec, "s", label="specificity")
axes[2].plot([0.65, 1], [0.65, 1], "k:", lw=1)
axes[2].set(xlabel="true", ylabel="EM estimate", title="rater performance recovered")
axes[2].legend()
plt.tight_layout()
plt.show()
assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:])), "EM decreased the log-likelihood"

# %% [markdown]
# ## 3. Soft labels and the M-step question
#
# Now each rater gives a probability $q_{it}(1) = p(y_{it} = 1)$ instead of
# a label: a network's output, or a mask softened at its border. Over all
# raters, $q_t(B) = \prod_i q_{it}(b_i)$ for every report vector
# $B \in \{0,1\}^P$. Soft-STAPLE maximises the *expected* log-likelihood
#
# $$L_\text{soft}(\theta) = \sum_t \sum_B q_t(B) \log p(B;\theta),\qquad
#   p(B;\theta) = \sum_a \pi_a \prod_i \theta[i, a, b_i]
#   \quad\text{(eq:soft-objective)}.$$
#
# Exchanging the sums, $L_\text{soft} = \sum_B Q(B) \log p(B;\theta)$ with
# the **soft pattern histogram** $Q(B) = \sum_t q_t(B)$ (eq:soft-histogram):
# binary STAPLE on $2^P$ patterns with fractional counts.
#
# The data: a `probability` phantom (`bayesfuse.phantoms`): rater $i$'s map
# is a sigmoid (slope 1 mm) of the object's signed distance, shifted by the
# rater's own offset (-1.5 to 1.5 mm) and perturbed by a smooth noise field.
# The voxel size grows as the grid shrinks, so that the small and the full
# settings show the same object.

# %%
ph = phantoms.make_phantom("probability", ndim=3, shape=SHAPE, n_raters=N_RATERS, random_seed=SEED,
                           spacing=48 / SHAPE[0])
soft = ph.raters
mid_soft = int(ph.truth.sum(axis=(0, 1)).argmax())  # the slice through the object's widest part
q = soft.maps.values.reshape(N_RATERS, -1).astype(float)  # q_it(1), (P, N)

# every report vector B, as the rows of a (2^P, P) array; row j has the code sum_i b_i 2^i
B = np.array(list(itertools.product([0, 1], repeat=N_RATERS)))[:, ::-1]
qB = np.prod(np.where(B[:, :, None] == 1, q[None], 1 - q[None]), axis=1)  # q_t(B), (2^P, N)
Q = qB.sum(axis=1)
np.testing.assert_allclose(Q, ss.soft_histogram(q), rtol=1e-10)
print(f"Q has {Q.size} entries summing to {Q.sum():.1f} = N; ss.soft_histogram agrees")

fig, axes = plt.subplots(1, N_RATERS, figsize=(2.4 * N_RATERS, 2.6))
for i in range(N_RATERS):
    axes[i].imshow(soft.maps.values[i, :, :, mid_soft], cmap="magma", vmin=0, vmax=1)
    axes[i].set_title(f"rater {i}: q(1)")
    axes[i].axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# **E-step** (eq:soft-estep): STAPLE's, on every pattern $B$:
# $r_B(1) = p(x = 1 \mid B; \theta)$. The consensus of a voxel is
# $w_t(1) = \sum_B q_t(B)\, r_B(1)$ (eq:soft-posterior).
#
# **M-step, derived** (eq:soft-mstep). The EM bound of $L_\text{soft}$ has,
# for $\theta_{i1}$, the terms
# $\sum_B Q(B)\, r_B(1)\, [b_i \log\theta_{i1} + (1-b_i)\log(1-\theta_{i1})]$,
# which are maximised by
#
# $$\theta_{i1} = \frac{\sum_B Q(B)\, r_B(1)\, b_i}{\sum_B Q(B)\, r_B(1)}
#   = \frac{\sum_t \sum_B q_t(B)\, r_B(1)\, b_i}{\sum_t w_t(1)}.$$
#
# **M-step, the paper's literal reading** (eq:soft-paper-mstep): "the M-step
# remains the same", i.e. STAPLE's update with $q_{it}(1)$ in place of
# $y_{it}$:
#
# $$\theta_{i1}^\text{paper} = \frac{\sum_t q_{it}(1)\, w_t(1)}{\sum_t w_t(1)}.$$
#
# The denominators agree; the numerators differ by
# $\sum_t \operatorname{Cov}_{B \sim q_t}(b_i, r_B(1))$: within a voxel,
# a rater who says "1" makes $x = 1$ more likely, and the paper's update
# drops that covariance. Let us run both from the same start and watch
# $L_\text{soft}$.

# %%
pi1_soft = q.mean()  # the "raters" prior, as for STAPLE


def pattern_posterior(sens, spec):
    """r_B(1) for every B, and log p(B; theta)."""
    log1 = np.log(pi1_soft) + (B * np.log(sens) + (1 - B) * np.log1p(-sens)).sum(1)
    log0 = np.log1p(-pi1_soft) + (B * np.log1p(-spec) + (1 - B) * np.log(spec)).sum(1)
    log_p = np.logaddexp(log0, log1)
    return np.exp(log1 - log_p), log_p


def l_soft(sens, spec):
    return Q @ pattern_posterior(sens, spec)[1]


def m_step_derived(r1):
    return (B.T @ (Q * r1)) / (Q @ r1), ((1 - B).T @ (Q * (1 - r1))) / (Q @ (1 - r1))


def m_step_paper_by_hand(r1):
    w1 = r1 @ qB  # w_t(1) = sum_B q_t(B) r_B(1)
    return (q @ w1) / w1.sum(), ((1 - q) @ (1 - w1)) / (1 - w1).sum()


def run_em(m_step, n_iter=400):
    w1 = q.mean(axis=0)  # ITK's start, generalised (eq:soft-init)
    sens, spec = (q @ w1) / w1.sum(), ((1 - q) @ (1 - w1)) / (1 - w1).sum()
    trace = []
    for _ in range(n_iter):
        r1, log_p = pattern_posterior(sens, spec)
        trace.append(Q @ log_p)
        sens, spec = m_step(r1)
    return sens, spec, np.array(trace)


sens_d, spec_d, trace_d = run_em(m_step_derived)
sens_p, spec_p, trace_p = run_em(m_step_paper_by_hand)
print(f"L_soft after 400 iterations: derived {trace_d[-1]:.3f}, paper {trace_p[-1]:.3f}")
print(f"largest decrease of L_soft in one step: derived {max(0, -np.diff(trace_d).min()):.2e}, "
      f"paper {max(0, -np.diff(trace_p).min()):.2e}")

# %% [markdown]
# Which one is a stationary point of $L_\text{soft}$? A fixed point of EM
# should have zero gradient. We check by central finite differences of the
# brute-force $L_\text{soft}$:

# %%
def gradient(sens, spec, h=1e-6):
    g = []
    for which in range(2):
        for i in range(N_RATERS):
            step = np.zeros((2, N_RATERS))
            step[which, i] = h
            g.append((l_soft(sens + step[0], spec + step[1]) - l_soft(sens - step[0], spec - step[1])) / (2 * h))
    return np.array(g)


grad_d, grad_p = gradient(sens_d, spec_d), gradient(sens_p, spec_p)
print(f"largest |dL_soft/dtheta| at the derived fixed point: {np.abs(grad_d).max():.2e}")
print(f"largest |dL_soft/dtheta| at the paper's fixed point: {np.abs(grad_p).max():.2e}")
assert trace_d[-1] > trace_p[-1], "the derived M-step should reach a higher L_soft"
assert np.all(np.diff(trace_d) >= -1e-8 * np.abs(trace_d[1:])), "EM decreased L_soft"
assert np.abs(grad_p).max() > 100 * np.abs(grad_d).max()

# %% [markdown]
# And the library: `soft-staple` uses the derived M-step (on the histogram
# $Q$, two passes over the data in all), and `ss.m_step_paper` is the
# paper's update, kept only to show this. Both agree with our hand-written
# versions.

# %%
res_soft = bayesfuse.fuse(soft, "soft-staple", progress=False)
np.testing.assert_allclose(res_soft.raters["sensitivity"].values, sens_d, atol=1e-5)
np.testing.assert_allclose(res_soft.raters["specificity"].values, spec_d, atol=1e-5)
r1_p, _ = pattern_posterior(sens_p, spec_p)
lib_paper = ss.m_step_paper(q, np.ones(q.shape[1]), r1_p @ qB)
np.testing.assert_allclose(np.concatenate(lib_paper), np.concatenate(m_step_paper_by_hand(r1_p)), rtol=1e-10)
print("bayesfuse soft-staple == derived EM by hand; ss.m_step_paper == the paper's step by hand")
print(f"sensitivities, derived: {sens_d.round(3)}  paper: {sens_p.round(3)}")

# %% [markdown]
# Where does the paper's update lose? The covariance term
# $\operatorname{Cov}_{B\sim q_t}(b_i, r_B(1)) = \sum_B q_t(B) r_B(1) b_i -
# q_{it}(1) w_t(1)$ is zero wherever the rater is certain ($q_{it} \in
# \{0, 1\}$), which is why both updates reduce to STAPLE on hard masks, and
# positive where the rater hesitates: at the border.

# %%
r1_d, _ = pattern_posterior(sens_d, spec_d)
w1_d = r1_d @ qB
rater = 0
cov = (r1_d * B[:, rater]) @ qB - q[rater] * w1_d
fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
axes[0].plot(trace_d, label="derived M-step (EM)")
axes[0].plot(trace_p, label="paper's M-step")
axes[0].set(xlabel="iteration", ylabel="L_soft", title="L_soft along the iterations", xscale="log")
axes[0].legend()
axes[1].imshow(q[rater].reshape(SHAPE)[:, :, mid_soft], cmap="magma", vmin=0, vmax=1)
axes[1].set_title(f"rater {rater}: q(1)")
im = axes[2].imshow(cov.reshape(SHAPE)[:, :, mid_soft], cmap="viridis")
axes[2].set_title("Cov(b_i, r_B(1)) per voxel")
plt.colorbar(im, ax=axes[2], fraction=0.046)
axes[3].imshow(res_soft.probability.values[:, :, mid_soft, 1], cmap="magma", vmin=0, vmax=1)
axes[3].contour(ph.truth[:, :, mid_soft], levels=[0.5], colors="cyan", linewidths=0.8)
axes[3].set_title("soft-STAPLE consensus, truth in cyan")
for ax in axes[1:]:
    ax.axis("off")
plt.tight_layout()
plt.show()
assert cov.min() > -1e-9, "the covariance should be non-negative here (raters better than chance)"

# %% [markdown]
# ## 4. Simplified soft-STAPLE, briefly
#
# The exact model costs $2^P$ per voxel. The simplified model of seed 001
# treats each soft label as a noisy observation of a hidden hard report,
# $p(z_{it} \mid x = 1) = q_{it}(1)\theta_{i1} + q_{it}(0)(1 - \theta_{i1})$
# (eq:simplified-likelihood): linear in $P$. Its M-step has no closed form
# with only $x$ hidden; making the hard report hidden too gives a closed-form
# EM (eq:simplified-mstep). Its sensitivities describe the hidden *hard*
# reports, so they come out higher than the exact model's; with flat priors
# they can even reach 1 (the card explains why). Beta(2, 2) priors keep
# them inside.

# %%
res_simple = bayesfuse.fuse(soft, "soft-staple-simplified", progress=False,
                            sensitivity_prior=(2.0, 2.0), specificity_prior=(2.0, 2.0))
table = result.raters[[]].copy()
table["exact sensitivity"] = res_soft.raters["sensitivity"].values
table["simplified sensitivity"] = res_simple.raters["sensitivity"].values
table["exact specificity"] = res_soft.raters["specificity"].values
table["simplified specificity"] = res_simple.raters["specificity"].values
print(table.round(3))
assert np.all(np.diff(res_simple.objective) >= -1e-8 * np.abs(res_simple.objective[1:]))

# %% [markdown]
# ## 5. The same models in PyMC, and NUTS against EM
#
# `staple.build_model` states the model declaratively. The true label is
# summed out (NUTS cannot sample a discrete variable, and the sum is exact),
# and the data enter as the pattern table:
#
# | PyMC variable | dims | in the equations |
# |---|---|---|
# | `patterns`, `counts` | (rater, pattern), (pattern) | the table of (eq:staple-patterns) |
# | `sensitivity`, `specificity` | (rater) | $\theta_{i1}$, $\theta_{i0}$, Beta priors (flat by default) |
# | `class_prior` | (class) | $\pi$, pinned at EM's value (`hyper="fixed"`) |
# | `loglik` | | `pm.Potential`: $\sum_j c_j \log\sum_a \pi_a \prod_i \theta[i, a, y_{ij}]$ (eq:staple-objective) |
#
# First check: the model's log density at the EM estimate equals the EM
# objective (flat priors: the Beta(1, 1) densities are 1).

# %%
import arviz as az
import arviz_plots as azp
import pymc as pm

model = staple.build_model(data, None, "fixed", staple.fixed_from_result(result))
print(model.str_repr())


def value_point(model, natural):
    """The model's value variables (log-odds for Beta) at natural parameter values."""
    point = {}
    for rv in model.free_RVs:
        transform = model.rvs_to_transforms.get(rv)
        x = np.asarray(natural[rv.name], dtype=float)
        point[model.rvs_to_values[rv].name] = transform.forward(x, *rv.owner.inputs).eval() if transform else x
    return point


logp = model.compile_logp(jacobian=False)
em_point = value_point(model, {"sensitivity": lib_sens, "specificity": lib_spec})
print(f"PyMC log density at the EM estimate: {float(logp(em_point)):.6f}")
print(f"EM objective:                        {result.objective[-1]:.6f}")
np.testing.assert_allclose(float(logp(em_point)), result.objective[-1], rtol=1e-9)

# %% [markdown]
# Now NUTS. EM gives the mode; `result.posterior_draws` adds a Laplace
# approximation in logit space around it (eq:staple-laplace). On a problem
# with thousands of voxels per parameter the posterior is nearly Gaussian,
# so we expect: the EM estimate near the centre of NUTS's draws (small
# z-scores) and Laplace standard deviations close to NUTS's (ratios near 1).
# The forest plot shows both: NUTS's draws and the Laplace draws, with their
# 50 % and 94 % intervals.

# %%
with model:
    idata = pm.sample(draws=NUTS_DRAWS, tune=NUTS_DRAWS, chains=NUTS_CHAINS, cores=1, nuts_sampler="pymc",
                      random_seed=SEED, progressbar=False)


def like_chains(draws, idata):
    """Laplace draws arranged in (chain, draw) as NUTS's, so that ArviZ overlays them
    (arviz_plots aligns the two trees on chain and draw)."""
    post = draws["posterior"].to_dataset()
    c, d = idata["posterior"].sizes["chain"], idata["posterior"].sizes["draw"]
    ds = xr.Dataset({name: (("chain", "draw", "rater"), post[name].values.reshape(c, d, -1)) for name in post.data_vars},
                    coords={"rater": post["rater"].values})
    return xr.DataTree.from_dict({"posterior": ds})


laplace = like_chains(result.posterior_draws(NUTS_DRAWS * NUTS_CHAINS, random_seed=SEED), idata)
print(az.summary(idata, var_names=["sensitivity", "specificity"]))


def compare(idata, result, laplace):
    rows = []
    for name in ("sensitivity", "specificity"):
        draws = idata["posterior"][name].values.reshape(-1, N_RATERS)
        lap = laplace["posterior"][name].values.reshape(-1, N_RATERS)
        z = (result.raters[name].values - draws.mean(0)) / draws.std(0)
        rows += [(name, i, z[i], lap.std(0)[i] / draws.std(0)[i]) for i in range(N_RATERS)]
    return rows


rows = compare(idata, result, laplace)
print(f"{'parameter':<14}{'rater':>6}{'z of EM':>10}{'sd Laplace/NUTS':>18}")
for name, i, z, ratio in rows:
    print(f"{name:<14}{i:>6}{z:>10.2f}{ratio:>18.2f}")

# %%
pc = azp.plot_forest({"NUTS": idata, "EM + Laplace": laplace}, var_names=["sensitivity", "specificity"],
                     combined=True, backend="matplotlib")
pc.add_legend("model")
plt.show()

health = az.rhat(idata, var_names=["sensitivity", "specificity"])
assert max(float(health[v].max()) for v in ("sensitivity", "specificity")) < 1.02, "NUTS did not mix"
assert int(idata["sample_stats"]["diverging"].sum()) == 0
assert all(abs(z) < 3.5 for _, _, z, _ in rows), "EM's estimate is far from NUTS's posterior"
assert all(1 / 1.35 < r < 1.35 for *_, r in rows), "the Laplace width disagrees with NUTS"

# %% [markdown]
# ### Soft-STAPLE in PyMC
#
# Exact soft-STAPLE's PyMC form is a `pm.Potential` of $\sum_B Q(B) \log
# p(B;\theta)$ (eq:soft-objective in the form of eq:soft-histogram).
# $\exp(L_\text{soft})$ is not a likelihood (it is an *expected*
# log-likelihood), so NUTS samples a pseudo-posterior; its mode is still
# the EM estimate, which is what we check.

# %%
soft_model = ss.build_model(soft, None, "fixed", ss.fixed_from_result(res_soft))
soft_logp = soft_model.compile_logp(jacobian=False)
soft_point = value_point(soft_model, {"sensitivity": sens_d, "specificity": spec_d})
np.testing.assert_allclose(float(soft_logp(soft_point)), l_soft(sens_d, spec_d), rtol=1e-8)
print("PyMC log density == brute-force L_soft at the EM estimate")
with soft_model:
    idata_soft = pm.sample(draws=NUTS_DRAWS, tune=NUTS_DRAWS, chains=NUTS_CHAINS, cores=1, nuts_sampler="pymc",
                           random_seed=SEED, progressbar=False)
laplace_soft = like_chains(res_soft.posterior_draws(NUTS_DRAWS * NUTS_CHAINS, random_seed=SEED), idata_soft)
rows_soft = compare(idata_soft, res_soft, laplace_soft)
print(f"largest |z| of the EM estimate: {max(abs(z) for _, _, z, _ in rows_soft):.2f}; "
      f"Laplace/NUTS sd ratios {min(r for *_, r in rows_soft):.2f}-{max(r for *_, r in rows_soft):.2f}")

pc = azp.plot_forest({"NUTS": idata_soft, "EM + Laplace": laplace_soft}, var_names=["sensitivity", "specificity"],
                     combined=True, backend="matplotlib")
pc.add_legend("model")
plt.show()
assert all(abs(z) < 3.5 for _, _, z, _ in rows_soft)

# %% [markdown]
# ## What to take away
#
# - STAPLE's EM is a dozen lines of NumPy; the library computes the same
#   thing on the pattern table, so its cost does not grow with iterations.
# - "The M-step remains the same" is ambiguous for soft labels. Read
#   literally, it drops a covariance term: its fixed point is not a
#   stationary point of $L_\text{soft}$, it ends lower, and it can even
#   decrease $L_\text{soft}$ on the way. The derived M-step is an EM step:
#   monotone, and stationary at its fixed point. `bayesfuse` uses it.
# - The PyMC models have the EM objective as their log density, and NUTS
#   agrees with EM plus a Laplace approximation where the data are many.
#
# Next: [02_robust_student_t.py](02_robust_student_t.py), a model whose
# raters can be unreliable *locally*.
