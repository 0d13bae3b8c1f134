"""What the cross-check compares for each model, and the pass criteria.

The harness (:mod:`bayesfuse.crosscheck`) works on the model contract; this
module holds the two things it cannot read from the contract:

- :data:`CRITERIA`: per registry name, which latent variables are compared,
  the thresholds, and the reason (restated in each model card's
  "Cross-check" section);
- the adapters of the EM family, whose "posterior" is a point estimate of
  the rater parameters theta plus the exact posterior of the labels given
  theta: the label posterior averaged over NUTS draws of theta
  (:func:`label_posterior`), the point estimate in the PyMC model's
  variable names (:func:`point_estimate`), and log q of the Laplace
  approximation for the k-hat (:func:`q_block`).

What "solver vs NUTS" means per family
--------------------------------------
EM (STAPLE family, PSTAPLE): the PyMC model has the labels summed out, so
NUTS samples theta. (1) The EM estimate must be the posterior mode: no NUTS
draw may have a higher log posterior density (``mode``; sharp: a wrong
M-step moves the point off the mode). (2) Where the model stores a Laplace
approximation (binary STAPLE, soft-STAPLE), its draws are compared with NUTS
per parameter, on the parameters inside (0, 1): at a boundary estimate (a
rater with no false negatives: sensitivity 1) the logit is unbounded and
the approximation is a point by construction. (3) The consensus: the label
indicator's posterior Bernoulli(w_t(theta_EM)) against Bernoulli(E[w_t(theta)])
over the NUTS draws, on the contested voxels (where the raters' hard labels
differ; elsewhere both are 0 or 1 and agree trivially).

VB (robust-t family, mixture): q and NUTS sample the same latent variables
(the link-space consensus, biases, local reliabilities) with the
point-estimated hyperparameters pinned at the solver's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import xarray as xr


@dataclass(frozen=True)
class Rule:
    """The criterion of one compared variable.

    Attributes
    ----------
    variable : str
        PyMC variable name (``consensus``: the labels' posterior of an EM model).
    within_sd : float
        |z| = |mean_q - mean_NUTS| / sd_NUTS counted as agreement.
    share : float or None
        Share of the elements (``where``) that must be within ``within_sd``;
        None: reported, not required.
    where : {"all", "contested", "interior"}
        ``contested``: voxels where the raters' hard labels differ;
        ``interior``: elements where q has spread (Laplace parameters off the
        boundary).
    sd_ratio : (float, float) or None
        Required range of the median sd_q / sd_NUTS (None: reported only).
    required : bool
        Whether a failure fails the check.
    labels : bool
        The variable is the posterior probability of a discrete label (a
        deterministic of the PyMC model, e.g. the mixture's
        ``responsibility``): the solver's probabilities are compared with the
        NUTS mean as two categorical posteriors of the label
        (:func:`bayesfuse.crosscheck_stats.bernoulli_stats`), not draw by draw.
    """

    variable: str
    within_sd: float = 0.5
    share: float | None = 0.95
    where: str = "all"
    sd_ratio: tuple[float, float] | None = None
    required: bool = True
    labels: bool = False

    def describe(self) -> str:
        parts = []
        if self.share is not None:
            parts.append(f">= {self.share:.0%} of {self.where} elements within {self.within_sd:g} NUTS sd")
        if self.sd_ratio is not None:
            parts.append(f"median sd ratio in [{self.sd_ratio[0]:.2f}, {self.sd_ratio[1]:.2f}]")
        return "; ".join(parts) if parts else "reported only"


@dataclass(frozen=True)
class Criteria:
    """A model's cross-check: compared variables, thresholds, and why.

    Attributes
    ----------
    family : {"em", "vb"}
    rules : tuple of Rule
    mode : bool
        EM: the point estimate must be the posterior mode (no NUTS draw with
        a higher log density).
    khat_max : float or None
        Largest PSIS k-hat of q against the posterior on its blocks (None:
        reported only, or no q density).
    downsample : {"mean", "majority", "stride"}
        How ``bayesfuse check --downsample`` reduces binary masks for this
        model (:meth:`bayesfuse.data.RaterMaps.downsample`).
    sbc_options : dict
        Config options used by the SBC (priors that draw plausible raters).
    diagnose : callable or None
        ``diagnose(data, config, result, fixed, post) -> ({name: Dataset},
        notes)``: run when NUTS is not healthy, to say why; the datasets go
        to ``/diagnostics/<name>``, and one with ``n_modes >= 2`` somewhere
        makes the verdict say the posterior is multimodal (robust-t: its
        per-voxel modes, :func:`robust_t_modes`, as ``T_modes``).
    nuts_form : dict
        Options of ``build_model`` for the model NUTS samples, when a
        reparameterisation of the same posterior samples better (robust-t
        family: ``bias_form="mean-split"``); the k-hat and the mode check use
        the default form, whose variables are q's.
    reason : str
        Why these criteria (restated in the card).
    """

    family: str
    rules: tuple[Rule, ...]
    mode: bool = False
    khat_max: float | None = None
    downsample: str = "mean"
    sbc_options: dict = field(default_factory=dict)
    nuts_form: dict = field(default_factory=dict)
    diagnose: Callable | None = None
    reason: str = ""


_EM_REASON = (
    "EM returns the posterior mode of theta and the exact label posterior given it. The mode check is sharp "
    "(a wrong M-step leaves the mode). The labels' posterior with theta integrated out by NUTS differs from "
    "the plug-in one only through theta's uncertainty, which is small against a Bernoulli sd on the contested "
    "voxels: >= 95% within 0.5 sd."
)
_LAPLACE_REASON = (
    " The Laplace approximation of theta (Gaussian in logit space, centred at the EM mode) is compared on the "
    "parameters inside (0, 1): every one within 1 NUTS sd (its centre is the mode, and a parameter estimated from "
    "a few dozen voxels near 0 or 1 has a skewed posterior whose mean lies up to about one sd from its mode: "
    "Beta(30, 1.5) has (mean - mode) / sd = 0.8), median sd ratio in [0.67, 1.5] (a wrong information matrix "
    "fails it), joint k-hat <= 0.7 (q usable as an importance proposal for the posterior)."
)

_THETA_LAPLACE = (
    Rule("sensitivity", within_sd=1.0, share=1.0, where="interior", sd_ratio=(2 / 3, 1.5)),
    Rule("specificity", within_sd=1.0, share=1.0, where="interior", sd_ratio=(2 / 3, 1.5)),
)
_CONSENSUS_EM = Rule("consensus", within_sd=0.5, share=0.95, where="contested")
#: SBC options of the STAPLE family. Raters better than chance: the flat
#: prior's mirror mode (x <-> 1 - x) makes the SBC measure label switching
#: rather than the solver. The class prior estimated: ITK's default fixes it at
#: the raters' foreground fraction, which false positives inflate (0.33 for a
#: true 0.22 at specificity 0.8), a misspecified hyperparameter that biases
#: every sensitivity and specificity, in NUTS's posterior as in EM's.
_STAPLE_SBC = {"sensitivity_prior": (8.0, 2.0), "specificity_prior": (8.0, 2.0), "prior": "estimate"}

_RT_REASON = (
    "With the hyperparameters (Sigma_p, nu_p, beta, alpha, Sigma_T) pinned at VB's estimates, NUTS samples the "
    "posterior of T~, b, tau, W that the mean-field q approximates. Given tau the posterior of (T~, b, W) is "
    "Gaussian, and mean-field VB of a Gaussian has the exact means (its fixed point solves the same linear "
    "equations): the means of T~ (every voxel and link coordinate) and of b within 0.5 NUTS sd on >= 95% of the "
    "elements. Their sds are reported, not required: a factorised Gaussian underestimates marginal variances "
    "where the factors are correlated (T~ and b share the common shift T~ + c, b - c, held only by the bias "
    "prior beta and the spatial prior; the card's calibration measures the shortfall). W's means and sds are "
    "reported. k-hat <= 0.7 on every block (one voxel's T~, b jointly): q usable as an importance proposal of "
    "the conditional posterior."
)
_RT_TAU = (
    " tau is reported: q(tau) is Gamma with the conditional's shape but a rate averaged over q(T~) q(b), and the "
    "T~-tau dependence is not Gaussian; its k-hat is required with the other blocks. The Student-t posterior is "
    "multimodal per voxel when nu_p is near or below 1 and the raters' values at a voxel differ by many times "
    "Sigma_p's sd (Sigma_p at its floor on tied data, block means at the boundary: the card): each group of raters "
    "makes a mode, q holds one, NUTS's chains sit in different ones, and the check says NUTS is not healthy instead "
    "of claiming agreement, with the modes' masses measured by quadrature (robust_t_modes)."
)
_RT_SPLIT = (
    " NUTS samples the same posterior written with the mean bias split off (T~ = V - sum_p A_p b_p, b = b_mean + "
    "b_dev, build_model(bias_form='mean-split', whiten=True)) and (W, b_mean) in coordinates that whiten their "
    "conditional posterior given V: the common shift of T~ and b, a ridge of the per-rater form that the diagonal "
    "mass matrix crosses slowly, is then one whitened variable. A linear change of variables with a constant "
    "Jacobian: the same posterior (tested)."
)
_RT_CSTAPLE = (
    " Continuous STAPLE: biases are ML parameters (pinned), T~ has a flat prior, so the posterior is an "
    "independent Gaussian per voxel, which q(T~) is exactly: means within 0.5 sd and k-hat near 0."
)

_MIXTURE_REASON = (
    "With pi and sigma^2 pinned, NUTS samples p(w | y) with the labels Z summed out, the posterior that "
    "q(w) q(Z) approximates. Given Z, the posterior of w is exactly Gaussian with q(w)'s precision (eq:mix-qw), so "
    "where the raters' assignments are clear q(w) is exact: every component weight within 0.5 NUTS sd. q(w) can be "
    "narrower than the posterior, never wider: p(w | y) is a mixture over Z of Gaussians whose variance is at least the "
    "mean of their variances, at least (by Jensen) the variance 1 / (1/omega^2 + sum_p r/sigma_p^2) of q. Median sd "
    "ratio in [0.67, 1.1] (1.1: the Monte Carlo error of two sds from 4000 draws, about 2%, with room; 0.67: mean "
    "field's shortfall where raters are shared, reported by the card), k-hat of q(w) jointly <= 0.7. The raters' "
    "assignments: q(z_p) against p(z_p = m | y), the NUTS mean of the "
    "responsibility deterministic, compared as two categorical posteriors: >= 95% of the (rater, component) "
    "probabilities within 0.5 sd of the label. The posterior has a mode per labelling of the components: NUTS "
    "chains are relabelled to q's components (Hungarian matching on w) before any comparison."
)


def _robust_t_diagnosis(data, config, result, fixed, post):
    """``Criteria.diagnose`` of the robust-t family: :func:`robust_t_modes` as ``T_modes``."""
    ds, notes = robust_t_modes(data, config, result, fixed, post)
    return ({} if ds is None else {"T_modes": ds}), notes

CRITERIA: dict[str, Criteria] = {
    "staple": Criteria("em", (*_THETA_LAPLACE, _CONSENSUS_EM), mode=True, khat_max=0.7, downsample="majority",
                       sbc_options=_STAPLE_SBC, reason=_EM_REASON + _LAPLACE_REASON),
    "soft-staple": Criteria("em", (*_THETA_LAPLACE, _CONSENSUS_EM), mode=True, khat_max=0.7, downsample="mean",
                            sbc_options=_STAPLE_SBC, reason=_EM_REASON + _LAPLACE_REASON
                            + " The density is the pseudo-posterior exp(L_soft) p(theta) that the PyMC form samples."),
    "soft-staple-simplified": Criteria(
        "em", (Rule("sensitivity", within_sd=1.0, share=1.0, where="interior", sd_ratio=(2 / 3, 2.0)),
               Rule("specificity", within_sd=1.0, share=1.0, where="interior", sd_ratio=(2 / 3, 2.0)), _CONSENSUS_EM),
        mode=True, khat_max=0.7, downsample="mean", sbc_options=_STAPLE_SBC,
        reason=_EM_REASON + _LAPLACE_REASON.replace("[0.67, 1.5]", "[0.67, 2]") + " The simplified model's posterior "
        "near theta = 1 is skewed in logit space too: its Laplace sds come out 1.4-1.6 times NUTS's (the card), "
        "hence the wider sd-ratio range; a wider q errs on the safe side."),
    "multi-staple": Criteria("em", (Rule("confusion", share=None), _CONSENSUS_EM), mode=True, downsample="majority",
                             reason=_EM_REASON + " No approximation of the confusion matrices' posterior is stored "
                             "(a point estimate): their z against NUTS is reported, not required."),
    "pstaple": Criteria("em", (Rule("theta", share=None), _CONSENSUS_EM), mode=True, downsample="mean",
                        reason=_EM_REASON + " PSTAPLE stores no posterior of theta (a point estimate): its z "
                        "against NUTS is reported, not required. MRF off only (no PyMC form with it)."),
    "robust-t": Criteria("vb", (Rule("T", within_sd=0.5, share=0.95, where="all"),
                                Rule("b", within_sd=0.5, share=0.95, where="all"),
                                Rule("tau", share=None), Rule("W", share=None)), khat_max=0.7, downsample="mean",
                         nuts_form={"bias_form": "mean-split", "whiten": True},
                         diagnose=_robust_t_diagnosis, reason=_RT_REASON + _RT_SPLIT + _RT_TAU),
    "gaussian": Criteria("vb", (Rule("T", within_sd=0.5, share=0.95, where="all"),
                                Rule("b", within_sd=0.5, share=0.95, where="all"),
                                Rule("W", share=None)), khat_max=0.7, downsample="mean",
                         nuts_form={"bias_form": "mean-split", "whiten": True}, reason=_RT_REASON + _RT_SPLIT),
    "continuous-staple": Criteria("vb", (Rule("T", within_sd=0.5, share=0.95, where="all"),), khat_max=0.7,
                                  downsample="mean", reason=_RT_REASON + _RT_CSTAPLE),
    "mixture": Criteria(
        "vb", (Rule("w", within_sd=0.5, share=1.0, where="all", sd_ratio=(2 / 3, 1.1)),
               Rule("responsibility", within_sd=0.5, share=0.95, where="all", labels=True)),
        khat_max=0.7, downsample="mean", reason=_MIXTURE_REASON),
}


def criteria_for(method: str) -> Criteria:
    """The criteria of a registry name, or a ConfigError saying why there are none."""
    from .models import get_model

    from .errors import ConfigError

    spec = get_model(method)
    if not spec.pymc:
        raise ConfigError(f"{method}: no PyMC form ({spec.note or 'a rule'}), so there is nothing to cross-check against NUTS")
    if method not in CRITERIA:
        raise ConfigError(f"{method}: no cross-check criteria are declared yet (bayesfuse/crosscheck_models.py)")
    return CRITERIA[method]


# ---------------------------------------------------------------- EM family
def confusion_draws(post: xr.Dataset) -> np.ndarray:
    """Draws of the confusion matrices theta[i, a, b] = p(y_i = b | x = a), (S, P, K, K).

    From ``sensitivity``/``specificity`` (binary), ``confusion`` (rater,
    true_class, rater_class) or PSTAPLE's ``theta`` (rater, decision, truth).
    """
    def stack(name, *dims):
        da = post[name].stack(sample=("chain", "draw")).transpose("sample", *dims)
        return np.asarray(da.values, dtype=np.float64)

    if "confusion" in post:
        return stack("confusion", "rater", "true_class", "rater_class")
    if "theta" in post:
        return stack("theta", "rater", "truth", "decision")
    sens, spec = stack("sensitivity", "rater"), stack("specificity", "rater")
    theta = np.empty(sens.shape + (2, 2))
    theta[..., 0, 0], theta[..., 0, 1] = spec, 1 - spec
    theta[..., 1, 0], theta[..., 1, 1] = 1 - sens, sens
    return theta


def _onto_grid(values: np.ndarray, data) -> np.ndarray:
    """(N_roi, K) values onto (*spatial, K), background outside the ROI."""
    k = values.shape[-1]
    roi = data.roi()
    out = np.zeros(data.shape + (k,))
    out[..., 0] = 1.0
    if roi is None:
        out.reshape(-1, k)[...] = values
    else:
        out[roi] = values
    return out


def label_posterior(method: str, data, config, result, post: xr.Dataset, max_draws: int | None = None) -> np.ndarray:
    """p(x_t = k | data) with theta integrated out over NUTS draws, (*spatial, K).

    Each draw's label posterior w_t(theta) comes from the model's own E-step
    (public update functions of its module); the class prior is the one the
    solver used (pinned in the PyMC model).
    """
    from .models import get_model

    mod_name = get_model(method).module
    theta = confusion_draws(post)
    if max_draws is not None and theta.shape[0] > max_draws:
        theta = theta[np.linspace(0, theta.shape[0] - 1, max_draws).astype(int)]
    prior = np.asarray(result.group("variational")["prior"].values, dtype=np.float64)
    if mod_name == "bayesfuse.models.staple":
        from . import patterns as pat
        from .models import staple

        pd = staple.pattern_data(data, config)
        acc = np.zeros((pd.values.shape[1], pd.n_classes))
        for t in theta:
            acc += staple.e_step(pd.values, t, prior)[0]
        return pat.expand(pd.patterns, acc / len(theta), data.shape, data.roi(), background=0)
    if mod_name == "bayesfuse.models.soft_staple":
        from .models import soft_staple as ss
        from .models import staple

        q = data.foreground(np.float64).reshape(data.n_raters, -1)
        roi = data.roi()
        if roi is not None:
            q = q[:, roi.ravel()]
        q = np.ascontiguousarray(q)
        acc = np.zeros(q.shape[1])
        out = np.empty(q.shape[1])
        patterns = ss.all_patterns(data.n_raters)
        for t in theta:
            if config.model == "exact":
                g = staple.e_step(patterns, t, prior)[0][:, 1]
                ss.soft_posterior(q, g, out)
            else:
                ss.simplified_e_step(q, None, t, prior, posterior=out)
            acc += out
        w1 = acc / len(theta)
        return _onto_grid(np.stack([1 - w1, w1], axis=1), data)
    if mod_name == "bayesfuse.models.pstaple":
        from .models import pstaple

        D, _ = pstaple._inputs(data)
        acc = np.zeros(D.shape[1:])
        for t in theta:
            # pstaple's theta is (rater, decision, truth); confusion_draws gives (rater, truth, decision)
            acc += pstaple.e_step(pstaple.log_likelihood_terms(D, np.swapaxes(t, 1, 2)), np.log(prior))[0]
        return _onto_grid(acc / len(theta), data)
    raise NotImplementedError(f"{method}: no label posterior under rater draws for module {mod_name}")


def point_estimate(method: str, result, model) -> dict[str, np.ndarray]:
    """The solver's point estimate of every free variable of the PyMC model, by name.

    Looked up in ``/raters`` then ``/variational`` under the variable's
    name; PSTAPLE's ``theta_t`` is its ``theta`` transposed.
    """
    groups = [result.group("raters"), result.group("variational")]
    out = {}
    for rv in model.free_RVs:
        name = rv.name
        if name == "theta_t" and "theta" in groups[0]:
            out[name] = np.swapaxes(groups[0]["theta"].values, -1, -2)
            continue
        for g in groups:
            if name in g:
                out[name] = np.asarray(g[name].values, dtype=np.float64)
                break
        else:
            raise KeyError(f"{method}: the result holds no estimate of the PyMC variable {name!r}")
    return out


def q_block(method: str, result, model, n: int, random_seed) -> tuple[dict[str, np.ndarray], np.ndarray, str] | None:
    """Draws from q on the PyMC model's value (unconstrained) scale, with log q.

    Binary STAPLE and soft-STAPLE store a Gaussian q of eta = logit(theta)
    over the parameters inside (0, 1) (``laplace_*`` of ``/variational``);
    the PyMC model's ``sensitivity``/``specificity`` have the log-odds
    transform, so eta is their value variable. Boundary parameters are held
    at the EM point (a conditional block).

    Returns
    -------
    (values, log_q, label) or None
        ``values``: value-variable name -> (n, ...) draws; ``log_q``: (n,);
        None when the result has no q density (a point estimate).
    """
    from scipy.stats import multivariate_normal

    var = result.group("variational")
    if "laplace_ok" not in var or int(var["laplace_ok"]) != 1:
        return None
    rng = np.random.default_rng(random_seed)
    mean = var["laplace_mean"].values
    cov = var["laplace_cov"].values
    inside = var["laplace_inside"].values.astype(bool)
    # boundary parameters: logit(1 - 1e-10) keeps the held value finite
    eta = np.broadcast_to(np.clip(mean, -23.0, 23.0), (n, mean.size)).copy()
    if not inside.any():
        return None
    mvn = multivariate_normal(mean[inside], cov[np.ix_(inside, inside)])
    eta[:, inside] = mvn.rvs(size=n, random_state=rng).reshape(n, -1)
    p = mean.size // 2
    names = {rv.name: model.rvs_to_values[rv].name for rv in model.free_RVs}
    values = {names["sensitivity"]: eta[:, :p], names["specificity"]: eta[:, p:]}
    label = f"Laplace q of {int(inside.sum())} parameters" + (f" ({int((~inside).sum())} at the boundary held fixed)" if (~inside).any() else "")
    return values, mvn.logpdf(eta[:, inside]).reshape(n), label


# ---------------------------------------------------------------- VB family
@dataclass
class Block:
    """Draws of one small block of latent variables from q, on the PyMC value scale.

    ``values`` maps value-variable names to (n, ...) arrays of the whole
    variable, equal to the fixed point outside the block; ``log_q`` (n,) is
    q's log density of the block on the value scale.
    """

    variable: str
    label: str
    values: dict
    log_q: np.ndarray


def _gauss_draws(mean: np.ndarray, cov: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n draws of N(mean, cov) and their log densities."""
    from scipy.stats import multivariate_normal

    mvn = multivariate_normal(mean, cov)
    x = np.asarray(mvn.rvs(size=n, random_state=rng)).reshape(n, -1)
    return x, np.asarray(mvn.logpdf(x)).reshape(n)


def robust_t_blocks(result, model, fixed_point: dict, n: int, random_seed, n_voxels: int = 6) -> list[Block]:
    """q's blocks of the robust-t family for the k-hat: T at single voxels, tau
    at the same voxels (all raters), and b (all raters jointly).

    The rest is held at q's means (``fixed_point``, value scale). The voxels
    are those where q(T) is widest, the hardest for a Gaussian q, and some
    spread over the rest of the volume.
    """
    from scipy.stats import gamma

    rng = np.random.default_rng(random_seed)
    var = result.group("variational")
    sdims = result.spatial_dims
    names = {rv.name: model.rvs_to_values[rv].name for rv in model.free_RVs}
    blocks: list[Block] = []
    S = var["S_T"].transpose(*sdims, "class", "class2").values.astype(float)
    mu = var["mu_T"].transpose(*sdims, "class").values.astype(float)
    shape = mu.shape[:-1]
    width = np.trace(S, axis1=-2, axis2=-1).ravel()
    order = np.argsort(-width)
    picks = list(order[: n_voxels // 2]) + list(order[:: max(1, order.size // max(1, n_voxels - n_voxels // 2))][: n_voxels - n_voxels // 2])
    picks = list(dict.fromkeys(int(i) for i in picks))
    for flat in picks:
        idx = np.unravel_index(flat, shape)
        if "T" in names:
            x, lq = _gauss_draws(mu[idx], S[idx], n, rng)
            vals = np.broadcast_to(fixed_point[names["T"]], (n,) + fixed_point[names["T"]].shape).copy()
            vals[(slice(None),) + idx] = x
            blocks.append(Block("T", f"T{list(map(int, idx))}", {names["T"]: vals}, lq))
        if "tau" in names and "tau_shape" in var:
            a = var["tau_shape"].values.astype(float)
            m = var["tau_mean"].transpose("rater", *sdims).values.astype(float)[(slice(None),) + idx]
            t = rng.gamma(a, m / a, size=(n, a.size))
            lq = (gamma.logpdf(t, a, scale=m / a) + np.log(t)).sum(axis=1)  # density of log tau
            key = names["tau"]
            vals = np.broadcast_to(fixed_point[key], (n,) + fixed_point[key].shape).copy()
            vals[(slice(None), slice(None)) + idx] = np.log(t)
            blocks.append(Block("tau", f"tau[:, {list(map(int, idx))}]", {key: vals}, lq))
    if "b" in names and "S_b" in var:
        mb, Sb = var["mu_b"].values.astype(float), var["S_b"].values.astype(float)
        draws, lq = [], np.zeros(n)
        for p in range(mb.shape[0]):
            x, l = _gauss_draws(mb[p], Sb[p], n, rng)
            draws.append(x)
            lq += l
        blocks.append(Block("b", "b (all raters)", {names["b"]: np.stack(draws, axis=1)}, lq))
    return blocks


def q_means(result, q_post: xr.Dataset, model) -> dict[str, np.ndarray]:
    """q's means of the PyMC model's free variables (natural scale), by name:
    from the result where it stores them (robust-t's mu_T, mu_b, tau_mean), else
    the mean of q's draws."""
    var = result.group("variational")
    sdims = result.spatial_dims
    out = {}
    for rv in model.free_RVs:
        name = rv.name
        if name == "T" and "mu_T" in var:
            out[name] = var["mu_T"].transpose(*sdims, "class").values.astype(float)
        elif name == "b" and "mu_b" in var:
            out[name] = var["mu_b"].values.astype(float)
        elif name == "tau" and "tau_mean" in var:
            out[name] = var["tau_mean"].transpose("rater", *sdims).values.astype(float)
        elif name in q_post:
            out[name] = q_post[name].mean(("chain", "draw")).values.astype(float)
        else:
            raise KeyError(f"no q mean of the PyMC variable {name!r}")
    return out


def mixture_blocks(result, model, fixed_point: dict, n: int, random_seed) -> list[Block]:
    """q(w) of the mixture as one block: every component's weights jointly.

    q(w) = prod_m N(mu_m, s_m I_Q) (eq:mix-qw in models/mixture.md); w has
    no transform, so the value scale is the natural one. The posterior it is
    weighed against is p(w | y) with Z summed out (the PyMC model's
    Potential), pi and sigma^2 pinned.
    """
    rng = np.random.default_rng(random_seed)
    var = result.group("variational")
    mu = var["w_mean"].values.astype(float)
    s = var["w_var"].values.astype(float)
    names = {rv.name: model.rvs_to_values[rv].name for rv in model.free_RVs}
    if mu.size == 0:
        return []  # one component and no principal mode: w is empty, nothing to weigh
    sd = np.broadcast_to(np.sqrt(s)[:, None], mu.shape)
    x, lq = _gauss_draws(mu.ravel(), np.diag(sd.ravel() ** 2), n, rng)
    return [Block("w", f"w (all {mu.shape[0]} components x {mu.shape[1]} modes)", {names["w"]: x.reshape((n,) + mu.shape)}, lq)]


def vb_blocks(method: str, result, model, fixed_point: dict, n: int, random_seed) -> list[Block]:
    """q's blocks for the k-hat of a VB model (robust-t family or mixture)."""
    from .models import get_model

    if get_model(method).module == "bayesfuse.models.mixture":
        return mixture_blocks(result, model, fixed_point, n, random_seed)
    return robust_t_blocks(result, model, fixed_point, n, random_seed)


def align_components(method: str, result, post: xr.Dataset) -> tuple[xr.Dataset, list[str]]:
    """NUTS draws relabelled to the solver's components (label switching).

    The mixture's posterior has one mode per labelling of its components;
    each chain explores one. Per chain, the permutation that brings the
    chain's mean of ``w`` closest to q's means (Hungarian algorithm,
    :func:`bayesfuse.models.mixture.match_components`) is applied to every
    variable with a ``component`` dim. Other models: unchanged.

    Returns
    -------
    (Dataset, notes)
        notes: one line per chain that was relabelled.
    """
    if "component" not in post.dims or "w" not in post:
        return post, []
    from .models.mixture import match_components

    ref = result.group("variational")["w_mean"].values
    w = post["w"].transpose("chain", "draw", "component", ...)
    m = post.sizes["component"]
    perms = []
    for c in range(post.sizes["chain"]):
        # the permutation match_components applies to w, read back from the chain means
        relabelled = match_components(w.isel(chain=[c]), ref)
        mean_new = relabelled.mean(("chain", "draw")).values.reshape(m, -1)
        mean_old = w.isel(chain=c).mean("draw").values.reshape(m, -1)
        perms.append([int(np.argmin(((mean_old - v) ** 2).sum(axis=1))) for v in mean_new])
    out = post.copy()
    notes = []
    for name, da in post.data_vars.items():
        if "component" not in da.dims:
            continue
        parts = [da.isel(chain=c).isel(component=perms[c]).assign_coords(component=da["component"].values)
                 for c in range(post.sizes["chain"])]
        out[name] = xr.concat(parts, dim="chain").transpose(*da.dims)
    for c, p in enumerate(perms):
        if p != sorted(p):
            notes.append(f"NUTS chain {c} explored the components in the order {p}: relabelled to q's")
    return out, notes


# ------------------------------------------------ robust-t: per-voxel modes
def _local_modes(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima of a log density on a 1-D or 2-D grid and the mass of each one's basin.

    Every grid point belongs to the basin of the local maximum that steepest
    ascent over its grid neighbours (3^ndim - 1 of them) reaches, so two
    peaks a few grid steps apart stay two basins.

    Returns
    -------
    (peaks, masses, basin)
        peaks: (M, ndim) grid indices, heaviest first; masses: (M,), summing
        to 1; basin: the index (into peaks) of every grid point's basin.
    """
    lp = lp - lp.max()
    w = np.exp(lp)
    w /= w.sum()
    shape = lp.shape
    flat = np.arange(lp.size).reshape(shape)
    pad = np.pad(lp, 1, constant_values=-np.inf)
    padi = np.pad(flat, 1, constant_values=-1)
    best, ptr = lp.copy(), flat.copy()
    for off in np.ndindex(*(3,) * lp.ndim):
        sl = tuple(slice(o, o + n) for o, n in zip(off, shape))
        better = pad[sl] > best
        best = np.where(better, pad[sl], best)
        ptr = np.where(better, padi[sl], ptr)
    ptr = ptr.ravel()
    for _ in range(64):  # pointer jumping: each round doubles the ascent followed
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            break
        ptr = nxt
    peaks, inverse = np.unique(ptr, return_inverse=True)
    masses = np.bincount(inverse, weights=w.ravel())
    order = np.argsort(-masses)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return np.stack(np.unravel_index(peaks[order], shape), axis=1), masses[order], rank[inverse].reshape(shape)


def robust_t_modes(data, config, result, fixed: dict, post: xr.Dataset, *, rhat_max: float = 1.01,
                   max_voxels: int = 64, mass_min: float = 0.01, voxels: np.ndarray | None = None) -> tuple[xr.Dataset | None, list[str]]:
    """Why NUTS's chains disagree on T~: the posterior's modes at those voxels.

    At each voxel where the chains' T~ has r_hat > ``rhat_max``, the
    posterior of T~[n] given W and b at their NUTS means (every chain
    pooled; they are global and mix) is, with tau integrated out,

        p(T~ | W, b, D) propto N(T~; Phi_n W + m, Sigma_T I) prod_p t_nu_p(D~[p, n]; T~ + b_p, Sigma_p)

    (models/robust_t.md (eq:rt-model); the textbook densities, not the
    solver's code), evaluated on a grid fine against the smallest Sigma_p
    (a tenth of its sd) over the box of the data and the prior mean. Its local maxima
    and their basins' masses say whether the posterior is multimodal there,
    which mode each chain sits in, and which one q(T~) holds.

    Only for the Student-t likelihood with one or two link coordinates.
    ``voxels`` (M, ndim) examines those voxels instead of the flagged ones.

    Returns
    -------
    (Dataset or None, notes)
        Per flagged voxel: ``n_modes`` (basins of mass >= ``mass_min``),
        ``mass_heaviest``, ``mass_second``, ``mass_q`` (the basin holding
        q's mean), ``share_chain`` (voxel, chain: each chain's share of
        draws in the heaviest basin, to set against ``mass_heaviest``), ``z_q`` (voxel, class: q's mean against this
        posterior's mean and sd); notes for the verdict.
    """
    import arviz_stats as azs
    from scipy import stats

    from . import gaussian as G
    from .models.robust_t import _config_of
    from .spatial import KroneckerBasis

    if "nu" not in fixed or "T" not in post:
        return None, []
    kd = G.prepare(data, config.link)
    P, D = kd.n_raters, kd.dim
    if D > 2:
        return None, []
    sdims, shape = data.spatial_dims, data.shape
    Dt = kd.coords().reshape((P,) + shape + (D,))
    T = post["T"].transpose("chain", "draw", *sdims, "class")
    if voxels is None:
        rh = azs.rhat(post[["T"]])["T"].transpose(*sdims, "class").values
        flagged = np.argwhere(np.nanmax(np.where(np.isnan(rh), np.inf, rh), axis=-1) > rhat_max)
    else:
        flagged = np.asarray(voxels, dtype=np.int64).reshape(-1, len(sdims))
        max_voxels = max(max_voxels, len(flagged))
    if flagged.size == 0:
        return None, []
    flagged = flagged[:max_voxels]
    Sigma, nu = np.asarray(fixed["Sigma"], float), np.asarray(fixed["nu"], float)
    b = post["b"].mean(("chain", "draw")).values if "b" in post else np.zeros((P, D))
    if config.spatial_prior and "W" in post:
        cfg = _config_of(result)
        basis = KroneckerBasis.create(shape, cfg.basis_spacing, cfg.basis_width, cfg.basis_origin,
                                      voxel_size=data.spacing, units=cfg.basis_units)
        W = post["W"].mean(("chain", "draw")).values.reshape(D, -1)
        prior_mean = ((W @ basis.dense().T).T + np.asarray(fixed.get("m", np.zeros(D)), float)).reshape(shape + (D,))
        prior_var = float(fixed["sigma_T"])
    else:
        prior_mean, prior_var = None, None
    eig = np.linalg.eigvalsh(Sigma)
    sd_min, sd_max = float(np.sqrt(eig.min())), float(np.sqrt(eig.max()))
    h = sd_min / 10
    mu_q = result.group("variational")["mu_T"].transpose(*sdims, "class").values.astype(float)
    n_chain = T.sizes["chain"]
    out = {k: [] for k in ("n_modes", "mass_heaviest", "mass_second", "mass_q", "share_chain", "z_q")}
    for idx in map(tuple, flagged):
        pts = Dt[(slice(None),) + idx] - b
        if prior_mean is not None:
            pts = np.vstack([pts, prior_mean[idx]])
        lo, hi = pts.min(0) - 8 * sd_max, pts.max(0) + 8 * sd_max
        axes = [np.arange(lo[k], hi[k] + h, h) for k in range(D)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        flat = grid.reshape(-1, D)
        lp = np.zeros(flat.shape[0])
        for p in range(P):
            lp += stats.multivariate_t(np.zeros(D), Sigma[p], df=nu[p]).logpdf(Dt[(p,) + idx] - b[p] - flat)
        if prior_mean is not None:
            lp += -0.5 * ((flat - prior_mean[idx]) ** 2).sum(axis=1) / prior_var
        lp = lp.reshape(grid.shape[:-1])
        peaks, masses, basin = _local_modes(lp)
        w = np.exp(lp - lp.max())
        w /= w.sum()
        mean = np.tensordot(w, grid, axes=(tuple(range(D)), tuple(range(D))))
        sd = np.sqrt(np.tensordot(w, (grid - mean) ** 2, axes=(tuple(range(D)), tuple(range(D)))))

        def basin_of(x):
            """Basin of points x (..., D): that of the nearest grid point."""
            ix = tuple(np.clip(np.rint((x[..., k] - lo[k]) / h).astype(int), 0, axes[k].size - 1) for k in range(D))
            return basin[ix]

        big = masses[masses >= mass_min]
        out["n_modes"].append(int(big.size))
        out["mass_heaviest"].append(float(masses[0]))
        out["mass_second"].append(float(masses[1]) if masses.size > 1 else 0.0)
        out["mass_q"].append(float(masses[basin_of(mu_q[idx])]))
        draws = T.values[(slice(None), slice(None)) + idx]  # (chain, draw, D)
        out["share_chain"].append((basin_of(draws) == 0).mean(axis=1))
        out["z_q"].append((mu_q[idx] - mean) / sd)
    coords = {"voxel": np.arange(len(flagged)), "chain": np.arange(n_chain), "class": post["T"]["class"].values}
    ds = xr.Dataset({
        "index": (("voxel", "spatial_dim"), flagged.astype(np.int64)),
        "n_modes": ("voxel", np.array(out["n_modes"])),
        "mass_heaviest": ("voxel", np.array(out["mass_heaviest"])),
        "mass_second": ("voxel", np.array(out["mass_second"])),
        "mass_q": ("voxel", np.array(out["mass_q"])),
        "share_chain": (("voxel", "chain"), np.array(out["share_chain"])),
        "z_q": (("voxel", "class"), np.array(out["z_q"])),
    }, coords=coords | {"spatial_dim": list(sdims)})
    ds.attrs["what"] = ("posterior of T~ per voxel given W, b at the NUTS means, tau integrated out, by grid "
                        f"quadrature (step {h:.3g}); basins by steepest ascent")
    multi = ds["n_modes"].values >= 2
    low_q = ds["mass_q"].values < 0.5 * ds["mass_heaviest"].values
    where = (f"the chains disagree (r_hat > {rhat_max:g}) at {len(flagged)} voxels" if voxels is None
             else f"{len(flagged)} voxels examined")
    notes = [
        f"T: {where}"
        + (f" (the first {max_voxels} examined)" if len(flagged) == max_voxels else "")
        + f"; there the posterior of T~ given NUTS's W, b (tau integrated out, grid quadrature) has >= 2 modes "
        f"of mass >= {mass_min:.0%} at {int(multi.sum())}, the second holding up to {ds['mass_second'].max().item():.0%}; "
        f"q's mean is in the heaviest mode at {int((ds['mass_q'].values >= ds['mass_heaviest'].values - 1e-12).sum())}, "
        f"in a mode of less than half its mass at {int(low_q.sum())} (down to {ds['mass_q'].min().item():.2g}); "
        f"each chain's share of draws in the heaviest mode is off its mass by up to "
        f"{float(np.abs(ds['share_chain'] - ds['mass_heaviest']).max()):.2f}; "
        f"against this posterior q's means are within 0.5 sd for {float(np.mean(np.abs(ds['z_q'].values) <= 0.5)):.0%} "
        "of these voxels' elements. NUTS does not cross between such modes, and a unimodal q holds one of them."
    ]
    return ds, notes
