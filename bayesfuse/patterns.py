"""Voxel-pattern compression: many voxels, few distinct rater patterns.

For hard labels the EM of STAPLE depends on the data only through the counts
of the distinct voxel patterns (the vector of the P raters' labels at a
voxel): there are at most K^P of them (2^P for binary masks), usually far
fewer, however many voxels the image has. Soft masks made by the protocol of
seed 001 hold a few levels only (0, gamma, 1), so they compress the same way.

So the family's solvers read the input once to make a :class:`Patterns`
table (pattern values and voxel counts, plus each voxel's pattern code), run
their iterations on the table, and write the consensus with one gather pass
(:func:`expand`). Card: ``models/staple.md`` (eq:staple-patterns).

The kernels are compiled with numba: each is one pass over the raters' maps
in the order they are stored (rater-major), without temporaries of the
image's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

#: Largest number of possible codes (K^P, or L^P for L levels) for which the
#: counts are kept in a dense array indexed by code (8 MB of float64); past
#: it the codes are compressed with a sort (:func:`numpy.unique`).
DENSE_MAX = 1 << 20

#: Most distinct values a soft input may hold and still count as quantised.
MAX_LEVELS = 16


@dataclass(frozen=True)
class Patterns:
    """The distinct voxel patterns of P raters' maps, with their counts.

    Attributes
    ----------
    values : ndarray (P, n)
        One column per distinct pattern: class labels (int) for hard labels,
        or the raters' foreground probabilities (float64) for quantised
        soft maps.
    counts : ndarray (n,), float64
        Number of voxels inside the region of interest with that pattern.
        Patterns seen only outside it have count 0.
    codes : ndarray (N,)
        Each voxel's pattern code (base ``base`` digits, rater i is digit i).
    pattern_of_code : ndarray or None
        Dense case: (base^P,) int64 mapping a code to its column in
        ``values`` (-1 for codes that do not occur).
    sorted_codes : ndarray or None
        Sparse case (base^P > :data:`DENSE_MAX`): the sorted distinct codes;
        column j of ``values`` has code ``sorted_codes[j]``.
    base : int
        K for labels, L (number of levels) for quantised soft maps.
    levels : ndarray or None
        The L level values (sorted) for soft maps; None for labels.
    """

    values: np.ndarray
    counts: np.ndarray
    codes: np.ndarray
    pattern_of_code: np.ndarray | None
    sorted_codes: np.ndarray | None
    base: int
    levels: np.ndarray | None = None

    @property
    def n_raters(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_patterns(self) -> int:
        return int(self.values.shape[1])


# --------------------------------------------------------------------------
# numba kernels: rater-major passes that LLVM vectorises
@numba.njit(cache=True, nogil=True)
def _encode_labels(labels, base, codes):
    p, n = labels.shape
    for t in range(n):
        codes[t] = 0
    m = 1
    for i in range(p):
        row = labels[i]
        for t in range(n):
            codes[t] += np.int64(row[t]) * m
        m *= base


@numba.njit(cache=True, nogil=True)
def _encode_levels(values, levels, codes):
    # ``levels`` is a tuple: its length is a compile-time constant and its
    # values stay in registers (an array could alias ``codes``)
    n_levels = len(levels)
    p, n = values.shape
    missed = 0
    for t in range(n):
        codes[t] = 0
    m = 1
    for i in range(p):
        row = values[i]
        for t in range(n):
            v = row[t]
            j = 0
            hit = False
            for k in range(n_levels):
                j += np.int64(v > levels[k])
                hit |= v == levels[k]
            # the levels may be a guess: count the values that are none of them
            missed += np.int64(not hit)
            codes[t] += j * m
        m *= n_levels
    return missed


@numba.njit(cache=True, nogil=True)
def _count(codes, roi, counts4):
    # four interleaved histograms: runs of equal codes (most of an image)
    # would otherwise chain every increment on the previous one
    n = codes.shape[0]
    if roi.shape[0] == n:
        for t in range(n):
            counts4[t & 3, codes[t]] += np.int64(roi[t])
    else:
        n4 = n - n % 4
        for t in range(0, n4, 4):
            counts4[0, codes[t]] += 1
            counts4[1, codes[t + 1]] += 1
            counts4[2, codes[t + 2]] += 1
            counts4[3, codes[t + 3]] += 1
        for t in range(n4, n):
            counts4[0, codes[t]] += 1


@numba.njit(cache=True, nogil=True)
def _find_levels(values, max_levels):
    found = np.empty(max_levels, dtype=values.dtype)
    n_found = 0
    for t in range(values.shape[0]):
        v = values[t]
        # no early break: a fixed short loop beats a mispredicted branch
        hit = False
        for j in range(n_found):
            hit |= found[j] == v
        if not hit:
            if n_found == max_levels:
                return found[:0]
            found[n_found] = v
            n_found += 1
    return found[:n_found].copy()


@numba.njit(cache=True, nogil=True)
def _gather_rows(table, codes, roi, background, out):
    n = codes.shape[0]
    k = table.shape[1]
    use_roi = roi.shape[0] == n
    for t in range(n):
        if use_roi and not roi[t]:
            for j in range(k):
                out[t, j] = 0.0
            out[t, background] = 1.0
        else:
            c = codes[t]
            for j in range(k):
                out[t, j] = table[c, j]


# --------------------------------------------------------------------------
def _code_dtype(n_codes: int):
    for dt in (np.uint8, np.uint16, np.uint32):
        if n_codes <= np.iinfo(dt).max + 1:
            return dt
    return np.uint64


def _flat(maps: np.ndarray) -> np.ndarray:
    """(P, *spatial) as a C-contiguous (P, N) view (a copy only if needed)."""
    return np.ascontiguousarray(maps).reshape(maps.shape[0], -1)


def _roi_flat(roi: np.ndarray | None, n: int) -> np.ndarray:
    if roi is None:
        return np.zeros(0, dtype=np.bool_)
    r = np.ascontiguousarray(roi, dtype=np.bool_).ravel()
    if r.shape[0] != n:
        raise ValueError(f"region of interest has {r.shape[0]} voxels, the maps {n}")
    return r


def _decode(codes: np.ndarray, base: int, n_raters: int) -> np.ndarray:
    """Digits of pattern codes, (P, n) int64."""
    out = np.empty((n_raters, codes.size), dtype=np.int64)
    rest = codes.astype(np.int64)
    for i in range(n_raters):
        out[i] = rest % base
        rest //= base
    return out


def _finish(codes, base, n_raters, roi_f, levels) -> Patterns:
    n_codes = base**n_raters
    if n_codes <= DENSE_MAX:
        counts4 = np.zeros((4, n_codes), dtype=np.int64)
        _count(codes, roi_f, counts4)
        counts_dense = counts4.sum(axis=0).astype(np.float64)
        # Only patterns met inside the ROI get a column: expand() gives the
        # voxels outside it the background without looking their code up.
        cols = np.flatnonzero(counts_dense)
        lookup = np.full(n_codes, -1, dtype=np.int64)
        lookup[cols] = np.arange(cols.size)
        digits = _decode(cols, base, n_raters)
        counts = counts_dense[cols]
        sorted_codes = None
    else:
        cols, inverse = np.unique(codes, return_inverse=True)
        sel = inverse if roi_f.size == 0 else inverse[roi_f]
        counts = np.bincount(sel, minlength=cols.size).astype(np.float64)
        digits = _decode(cols, base, n_raters)
        lookup = None
        sorted_codes = cols
    values = digits if levels is None else levels[digits]
    return Patterns(values=values, counts=counts, codes=codes, pattern_of_code=lookup,
                    sorted_codes=sorted_codes, base=base, levels=levels)


def compress_labels(labels: np.ndarray, n_classes: int, roi: np.ndarray | None = None) -> Patterns:
    """Distinct patterns of P raters' labels and their voxel counts.

    Parameters
    ----------
    labels : ndarray (P, *spatial), unsigned integers in 0..K-1
    n_classes : int
        K (2 for binary masks).
    roi : bool ndarray (*spatial), optional
        Only voxels inside count; every voxel still gets a code.

    Returns
    -------
    Patterns
        ``values`` are class labels, (P, n) int64.

    References
    ----------
    models/staple.md (eq:staple-patterns)
    """
    y = _flat(labels)
    p, n = y.shape
    if n_classes**p >= 2**63:
        raise ValueError(f"{p} raters with {n_classes} classes give more pattern codes than 64 bits hold")
    n_codes = n_classes**p
    roi_f = _roi_flat(roi, n)
    codes = np.empty(n, dtype=_code_dtype(n_codes))
    _encode_labels(y, np.int64(n_classes), codes)
    return _finish(codes, n_classes, p, roi_f, None)


def find_levels(values: np.ndarray, max_levels: int = MAX_LEVELS) -> np.ndarray | None:
    """The distinct values of soft maps, sorted, or None if there are more than ``max_levels``.

    One pass that stops as soon as a value beyond the ``max_levels``-th
    distinct one is met, so continuous maps are recognised at once.
    """
    found = _find_levels(np.asarray(values).reshape(-1), int(max_levels))
    if found.size == 0:
        return None
    return np.sort(found.astype(np.float64))


def compress_levels(values: np.ndarray, levels: np.ndarray, roi: np.ndarray | None = None) -> Patterns | None:
    """Distinct patterns of quantised soft maps whose values are among ``levels``.

    Parameters
    ----------
    values : ndarray (P, *spatial), float
        Foreground probabilities.
    levels : ndarray (L,)
        Candidate level values, sorted (e.g. from :func:`find_levels`).
    roi : bool ndarray (*spatial), optional

    Returns
    -------
    Patterns or None
        ``values`` are the level values, (P, n) float64; ``levels`` is set.
        None if some value of the maps is not one of ``levels``.

    References
    ----------
    models/staple.md (eq:staple-patterns)
    """
    q = _flat(values)
    p, n = q.shape
    levels = np.asarray(levels, dtype=np.float64)
    base = int(levels.size)
    if base < 1:
        raise ValueError("no levels")
    if base**p >= 2**63:
        return None
    n_codes = base**p
    roi_f = _roi_flat(roi, n)
    native = levels.astype(q.dtype)
    if not np.array_equal(native.astype(np.float64), levels):
        return None
    codes = np.empty(n, dtype=_code_dtype(n_codes))
    if _encode_levels(q, tuple(native), codes):
        return None
    return _finish(codes, base, p, roi_f, levels)


#: Stride of the sample in which :func:`compress_soft` first looks for levels.
SAMPLE_STRIDE = 61


def compress_soft(values: np.ndarray, roi: np.ndarray | None = None, max_levels: int = MAX_LEVELS) -> Patterns | None:
    """Compress soft maps if they hold few distinct values; None if they do not.

    The levels are first guessed on a sparse sample and the encoding pass
    checks every value against them, so quantised maps cost one pass; only
    when the guess misses a level is the full search run.

    Parameters
    ----------
    values : ndarray (P, *spatial), float
    roi : bool ndarray, optional
    max_levels : int
        More distinct values than this: continuous maps, return None.

    References
    ----------
    models/staple.md (eq:staple-patterns)
    """
    q = np.ascontiguousarray(values)
    guess = find_levels(q.reshape(-1)[::SAMPLE_STRIDE], max_levels)
    if guess is None:
        return None
    out = compress_levels(q, guess, roi)
    if out is not None:
        return out
    levels = find_levels(q, max_levels)
    if levels is None:
        return None
    return compress_levels(q, levels, roi)


def expand(patterns: Patterns, table: np.ndarray, shape: tuple[int, ...], roi: np.ndarray | None = None,
           background: int = 0) -> np.ndarray:
    """Per-pattern rows back onto the voxels: one gather pass.

    Parameters
    ----------
    patterns : Patterns
    table : ndarray (n, K)
        One row per pattern (column of ``patterns.values``), e.g. the
        posterior of the true class.
    shape : tuple
        Spatial shape of the output.
    roi : bool ndarray, optional
        Voxels outside get the one-hot row of ``background``.

    Returns
    -------
    ndarray (*shape, K), float32
    """
    table = np.asarray(table, dtype=np.float32)
    k = table.shape[1]
    n = patterns.codes.shape[0]
    out = np.empty((n, k), dtype=np.float32)
    roi_f = _roi_flat(roi, n)
    if patterns.pattern_of_code is not None:
        dense = np.zeros((patterns.pattern_of_code.size, k), dtype=np.float32)
        have = patterns.pattern_of_code >= 0
        dense[have] = table[patterns.pattern_of_code[have]]
        _gather_rows(dense, patterns.codes, roi_f, background, out)
    else:
        idx = np.searchsorted(patterns.sorted_codes, patterns.codes)
        _gather_rows(table, idx, roi_f, background, out)
    return out.reshape(*shape, k)
