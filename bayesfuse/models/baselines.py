"""Baselines: majority vote and the mean of probability maps.

Deterministic rules, not models: there is no generative story, hence no PyMC
form and nothing to cross-check. They follow the rest of the contract
(``Config``, ``fit``, registry entries ``majority-vote`` and ``mean``) so that
every tool of the package (CLI, comparison study, batch) treats them like the
models. Card: ``models/baselines.md``.

References
----------
.. [1] Seed 000 (robust fusion), section 4.2: majority vote and the mean as
   the baselines of the comparison (MODELS.md section 5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..data import RaterMaps
from ..errors import ConfigError
from ..result import FusionResult


@dataclass(frozen=True)
class Config:
    """Options of the baselines.

    Attributes
    ----------
    rule : {"majority-vote", "mean"}
        Which baseline (set by the registry name).
    ties : {"highest", "lowest", "split"}
        Majority vote only: what a voxel gets when several classes share the
        most votes. ``"highest"``: the tied class with the highest index (for
        binary masks, foreground wins a tie: the "at least half the raters"
        rule that LIDC's consensus uses); ``"lowest"``: the lowest index
        (background wins); ``"split"``: the probability map shares 1 equally
        between the tied classes and the label map takes the lowest of them.
    """

    rule: Literal["majority-vote", "mean"] = "majority-vote"
    ties: Literal["highest", "lowest", "split"] = "highest"

    def __post_init__(self):
        if self.rule not in ("majority-vote", "mean"):
            raise ConfigError(f"unknown baseline rule {self.rule!r}")
        if self.ties not in ("highest", "lowest", "split"):
            raise ConfigError(f"ties must be 'highest', 'lowest' or 'split', not {self.ties!r}")


def vote_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Votes per class, (*spatial, K), from labels (P, *spatial).

    One pass per class over the labels; counts fit in uint16 (P < 65536).

    References
    ----------
    models/baselines.md (eq:mv-votes)
    """
    counts = np.empty(labels.shape[1:] + (n_classes,), dtype=np.uint16)
    for k in range(n_classes):
        np.sum(labels == k, axis=0, dtype=np.uint16, out=counts[..., k])
    return counts


def majority_vote(labels: np.ndarray, n_classes: int, ties: str = "highest") -> np.ndarray:
    """Majority-vote consensus as a probability map (*spatial, K).

    Parameters
    ----------
    labels : ndarray (P, *spatial)
        Integer labels in 0..K-1.
    n_classes : int
        K.
    ties : {"highest", "lowest", "split"}
        See :class:`Config`.

    Returns
    -------
    ndarray (*spatial, K), float32
        One-hot on the winning class; with ``"split"``, 1/m on each of m tied
        classes.
    """
    counts = vote_counts(labels, n_classes)
    top = counts.max(axis=-1, keepdims=True)
    is_top = counts == top
    if ties == "split":
        prob = is_top.astype(np.float32)
        prob /= prob.sum(axis=-1, keepdims=True)
        return prob
    if ties == "highest":
        win = n_classes - 1 - np.argmax(is_top[..., ::-1], axis=-1)
    else:
        win = np.argmax(is_top, axis=-1)
    prob = np.zeros(counts.shape, dtype=np.float32)
    np.put_along_axis(prob, win[..., None], 1.0, axis=-1)
    return prob


def mean_map(data: RaterMaps) -> np.ndarray:
    """Voxel-wise mean of the raters' probability maps, (*spatial, K).

    References
    ----------
    models/baselines.md (eq:mean)
    """
    if data.n_classes == 2 and not data.has_class_axis:
        fg = data.foreground().mean(axis=0, dtype=np.float64).astype(np.float32)
        return np.stack([1 - fg, fg], axis=-1)
    return data.probabilities().mean(axis=0, dtype=np.float64).astype(np.float32)


def _rater_agreement(data: RaterMaps, labels_c: np.ndarray, roi: np.ndarray | None) -> dict:
    """Per rater: share of voxels whose label equals the consensus, and Dice for K = 2."""
    lab = data.labels()
    sel = (slice(None),) if roi is None else (slice(None), roi)
    agree = (lab == labels_c[None])[sel].reshape(data.n_raters, -1).mean(axis=1)
    out = {"agreement": ("rater", agree.astype(float))}
    if data.n_classes == 2:
        a = (lab[sel] == 1).reshape(data.n_raters, -1)
        b = (labels_c[None][sel] == 1).reshape(1, -1)
        inter = (a & b).sum(axis=1)
        denom = a.sum(axis=1) + b.sum(axis=1)
        dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
        out["dice_to_consensus"] = ("rater", dice.astype(float))
    return out


def fit(
    data: RaterMaps,
    config: Config | None = None,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    random_seed=None,
    progress: bool | None = None,
    method: str | None = None,
) -> FusionResult:
    """Apply the baseline rule (no iterations; the arguments of the contract
    that concern iterative solvers are accepted and ignored).

    Voxels outside the region of interest get the background class.
    """
    config = config or Config()
    t0 = time.perf_counter()
    if config.rule == "majority-vote":
        prob = majority_vote(data.labels(), data.n_classes, config.ties)
    else:
        prob = mean_map(data)
    roi = data.roi()
    if roi is not None:
        prob[~roi] = 0.0
        prob[~roi, 0] = 1.0
    labels_c = np.argmax(prob, axis=-1)
    raters = _rater_agreement(data, labels_c, roi)
    return FusionResult.build(
        method=method or config.rule,
        data=data,
        config=config,
        probability=prob,
        raters=raters,
        seconds=time.perf_counter() - t0,
    )
