"""Link functions between the probability simplex and R^K (MODELS.md section 1).

``F`` maps a probability vector over K classes (last axis) to R^K and ``F^-1``
maps back onto the simplex, with ``F^-1(F(p)) = p``. Every function is safe at
0 and 1: no NaN, no infinity, for any input in [0, 1].

- ``sqrt`` (default of the robust model): F(p) = sqrt(p),
  F^-1(r) = r**2 / sum_k r_k**2. The Gaussian likelihood in this space is tied
  to the Hellinger distance between maps.
- ``logit``: centred log-ratio of clipped probabilities,
  F(p) = log p_eps - mean_k log p_eps, F^-1 = softmax; for K = 2 the
  difference of the two components is the usual log-odds.
- ``identity``: F(p) = p, F^-1 projects onto the simplex by clipping at 0 and
  renormalising.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Clipping used by the logit link so that log(0) never occurs. Probabilities
#: are clipped to [EPS, 1 - EPS] before the log; 1e-6 keeps log-odds within
#: about +-14, the range a float32 probability map can express anyway.
EPS = 1e-6


def _renormalise(x: np.ndarray) -> np.ndarray:
    s = np.sum(x, axis=-1, keepdims=True)
    k = x.shape[-1]
    # A vector of zeros has no direction: send it to the uniform distribution.
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(s > 0, x / np.where(s > 0, s, 1), 1.0 / k)
    return out


def sqrt_forward(p: np.ndarray) -> np.ndarray:
    """F(p) = sqrt(p), with p clipped at 0 (MODELS.md 1, square-root link)."""
    return np.sqrt(np.clip(p, 0, None))


def sqrt_inverse(r: np.ndarray) -> np.ndarray:
    """F^-1(r) = r**2 / sum_k r_k**2; the origin maps to the uniform vector."""
    return _renormalise(np.square(r))


def logit_forward(p: np.ndarray) -> np.ndarray:
    """Centred log-ratio of p clipped to [EPS, 1 - EPS]."""
    lp = np.log(np.clip(p, EPS, 1 - EPS))
    return lp - lp.mean(axis=-1, keepdims=True)


def logit_inverse(r: np.ndarray) -> np.ndarray:
    """Softmax over the class axis, computed stably (max subtracted)."""
    z = r - np.max(r, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def identity_forward(p: np.ndarray) -> np.ndarray:
    """F(p) = p."""
    return np.asarray(p, dtype=np.result_type(p, np.float32))


def identity_inverse(r: np.ndarray) -> np.ndarray:
    """Clip at 0 and renormalise onto the simplex."""
    return _renormalise(np.clip(r, 0, None))


@dataclass(frozen=True)
class Link:
    """A named pair of maps simplex <-> R^K acting on the last axis."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return self.forward(p)


LINKS: dict[str, Link] = {
    "sqrt": Link("sqrt", sqrt_forward, sqrt_inverse),
    "logit": Link("logit", logit_forward, logit_inverse),
    "identity": Link("identity", identity_forward, identity_inverse),
}


def get_link(name: str) -> Link:
    """Look a link up by name (``sqrt``, ``logit`` or ``identity``)."""
    try:
        return LINKS[name]
    except KeyError:
        raise ValueError(f"unknown link {name!r}; choose one of {sorted(LINKS)}") from None
