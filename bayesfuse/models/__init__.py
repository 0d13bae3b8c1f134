"""The model zoo: a registry of fusion methods that share one contract.

Each ``bayesfuse/models/<module>.py`` exposes (DESIGN.md, "The model contract"):

``Config``
    a frozen dataclass of options and hyperparameters with working defaults;
``fit(data, config=None, *, max_iter, tol, random_seed, progress, method)``
    the closed-form solver (VB or EM), returning a
    :class:`~bayesfuse.result.FusionResult` with the objective at every
    iteration;
``build_model(data, config=None, hyper="fixed", fixed=None)``
    the declarative PyMC model with dims ``rater``, ``class``, ``x``, ``y``,
    ``z`` (absent for rules such as majority vote: say so with
    ``pymc=False`` in the registry);

and, for the cross-check (``bayesfuse.crosscheck``) of models with a PyMC
form:

``fixed_from_result(result) -> dict``
    the point-estimated hyperparameters to pin in ``build_model(hyper="fixed")``;
``posterior_draws(result, n, region=None, random_seed=None) -> DataTree``
    draws from q (or the EM posterior) with ``chain``/``draw`` dims and the
    PyMC model's variable names and dims.

One module may serve several registry names (``gaussian`` is ``robust-t``
with tau fixed to 1): a :class:`ModelSpec` carries the Config overrides that
make the difference.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to find and configure one fusion method.

    Attributes
    ----------
    name : str
        The method's name (``fuse(method=name)``, ``--method name``).
    module : str
        Dotted path of the implementing module, imported on first use.
    summary : str
        One line for ``bayesfuse models``.
    input : {"binary", "labels", "probability", "any"}
        What the method fuses; binary masks are accepted wherever
        probabilities are (as degenerate probabilities).
    pymc : bool
        Whether the module has a PyMC model (``build_model``).
    defaults : dict
        Config overrides that define this name (e.g. ``likelihood="gaussian"``).
    card : str
        File name of the model card under ``models/``.
    note : str
        Anything a user should know from the listing (e.g. why no PyMC model).
    """

    name: str
    module: str
    summary: str
    input: str = "any"
    pymc: bool = True
    defaults: dict = field(default_factory=dict)
    card: str = ""
    note: str = ""

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config(self, **options: Any):
        """The module's Config with this entry's defaults and the given options."""
        mod = self.load()
        cfg_cls = mod.Config
        names = {f.name for f in dataclasses.fields(cfg_cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(f"{self.name}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
        try:
            return cfg_cls(**{**self.defaults, **options})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.name}: {exc}") from None


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a method to the zoo (names are unique)."""
    if spec.name in REGISTRY and REGISTRY[spec.name] != spec:
        raise ValueError(f"model {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get_model(name: str) -> ModelSpec:
    """Look a method up by name, with a helpful error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))} (see `bayesfuse models`)") from None


def list_models() -> list[ModelSpec]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]


# --------------------------------------------------------------------------
# The zoo. Each model module adds its own lines here when it lands.
register(ModelSpec(
    name="majority-vote",
    module="bayesfuse.models.baselines",
    summary="Majority vote of hard labels, ties broken by an explicit rule",
    input="labels",
    pymc=False,
    defaults={"rule": "majority-vote"},
    card="baselines.md",
    note="a deterministic rule: no generative model, so no PyMC form",
))
register(ModelSpec(
    name="mean",
    module="bayesfuse.models.baselines",
    summary="Voxel-wise mean of the raters' probability maps",
    input="any",
    pymc=False,
    defaults={"rule": "mean"},
    card="baselines.md",
    note="a deterministic rule: no generative model, so no PyMC form",
))
register(ModelSpec(
    name="pstaple",
    module="bayesfuse.models.pstaple",
    summary="PSTAPLE: STAPLE for probability maps (soft evidence), Potts MRF of strength mrf_beta",
    input="any",
    pymc=True,
    card="pstaple.md",
    note="PyMC form only with the MRF off (mrf_beta=0): the Potts prior's partition function is intractable and NUTS cannot sample discrete labels",
))
register(ModelSpec(
    name="staple",
    module="bayesfuse.models.staple",
    summary="STAPLE: EM on binary masks, per-rater sensitivity and specificity (ITK-compatible defaults)",
    input="binary",
    pymc=True,
    defaults={"mode": "binary"},
    card="staple.md",
))
register(ModelSpec(
    name="multi-staple",
    module="bayesfuse.models.staple",
    summary="Multi-label STAPLE: EM on K-class label maps, per-rater confusion matrices",
    input="labels",
    pymc=True,
    defaults={"mode": "multi"},
    card="staple.md",
))
register(ModelSpec(
    name="soft-staple",
    module="bayesfuse.models.soft_staple",
    summary="Soft-STAPLE (exact): EM on the soft pattern histogram of soft binary maps; exact M-step derived (not the paper's)",
    input="probability",
    pymc=True,
    defaults={"model": "exact"},
    card="soft_staple.md",
    note="cost O(voxels x 2^P): refuses more than 16 raters with soft values (use soft-staple-simplified)",
))
register(ModelSpec(
    name="soft-staple-simplified",
    module="bayesfuse.models.soft_staple",
    summary="Simplified soft-STAPLE: soft reports as noisy observations, EM with hidden hard reports",
    input="probability",
    pymc=True,
    defaults={"model": "simplified"},
    card="soft_staple.md",
))
register(ModelSpec(
    name="robust-t",
    module="bayesfuse.models.robust_t",
    summary="Robust Student-t fusion (VB): local rater reliabilities tau, bias prior, spatial prior on Gaussian bases",
    input="probability",
    pymc=True,
    defaults={"likelihood": "student-t"},
    card="robust_t.md",
    note="binary masks are fused as one-hot probabilities; the paper converts them first (--to-prob geodesic/euclidean)",
))
register(ModelSpec(
    name="gaussian",
    module="bayesfuse.models.robust_t",
    summary="Gaussian fusion (VB): the robust model with tau fixed to 1, bias and spatial priors",
    input="probability",
    pymc=True,
    defaults={"likelihood": "gaussian"},
    card="robust_t.md",
))
register(ModelSpec(
    name="continuous-staple",
    module="bayesfuse.models.robust_t",
    summary="Continuous STAPLE (Warfield 2008): Gaussian, per-rater bias and covariance, no priors (EM, biases with sum zero)",
    input="probability",
    pymc=True,
    defaults={"likelihood": "gaussian", "bias": "ml", "spatial_prior": False},
    card="robust_t.md",
    note="the biases are determined only up to a common shift without a prior: fixed by sum_p b_p = 0",
))
register(ModelSpec(
    name="mixture",
    module="bayesfuse.models.mixture",
    summary="Mixture of consensuses (VB in principal coordinates, variational boosting): clusters of raters, one consensus each",
    input="any",
    pymc=True,
    card="mixture.md",
    note="the main consensus is the component with the largest weight; every component's map is in components.nii.gz",
))
