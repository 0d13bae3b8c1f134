"""Voxel-pattern compression against plain NumPy (np.unique over voxels)."""

from __future__ import annotations

import numpy as np
import pytest

from bayesfuse import patterns as pt


def _reference(columns: np.ndarray, roi: np.ndarray | None) -> dict:
    """Pattern -> count by np.unique over the voxels (inside the ROI)."""
    cols = columns.reshape(columns.shape[0], -1)
    if roi is not None:
        cols = cols[:, roi.ravel()]
    uniq, counts = np.unique(cols, axis=1, return_counts=True)
    return {tuple(u): int(c) for u, c in zip(uniq.T.tolist(), counts)}


def _table(p: pt.Patterns) -> dict:
    return {tuple(v): int(c) for v, c in zip(p.values.T.tolist(), p.counts) if c > 0}


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("use_roi", [False, True])
def test_compress_labels_counts_every_pattern(dense, use_roi, monkeypatch):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(5, 17, 9, 6)).astype(np.uint8)
    roi = rng.random((17, 9, 6)) < 0.6 if use_roi else None
    if not dense:
        monkeypatch.setattr(pt, "DENSE_MAX", 10)
    p = pt.compress_labels(labels, 3, roi)
    assert (p.pattern_of_code is not None) == dense
    assert _table(p) == _reference(labels, roi)
    # every voxel's code decodes to its own labels
    digits = np.stack([(p.codes.astype(np.int64) // 3**i) % 3 for i in range(5)])
    np.testing.assert_array_equal(digits, labels.reshape(5, -1))


@pytest.mark.parametrize("dense", [True, False])
def test_expand_writes_each_voxel_its_pattern_row(dense, monkeypatch):
    rng = np.random.default_rng(1)
    labels = (rng.random((4, 11, 13)) < 0.4).astype(np.uint8)
    roi = rng.random((11, 13)) < 0.7
    if not dense:
        monkeypatch.setattr(pt, "DENSE_MAX", 4)
    p = pt.compress_labels(labels, 2, roi)
    table = rng.random((p.n_patterns, 2))
    out = pt.expand(p, table, (11, 13), roi, background=0)
    lookup = {tuple(v): table[j] for j, v in enumerate(p.values.T.tolist())}
    flat = labels.reshape(4, -1)
    for t in range(flat.shape[1]):
        x, y = divmod(t, 13)
        if roi[x, y]:
            np.testing.assert_allclose(out[x, y], lookup[tuple(flat[:, t])], rtol=1e-6)
        else:
            np.testing.assert_array_equal(out[x, y], [1.0, 0.0])


def test_soft_maps_with_few_levels_compress_and_continuous_maps_do_not():
    rng = np.random.default_rng(2)
    gamma = np.float32(0.3)
    levels = np.array([0.0, gamma, 1.0], dtype=np.float32)
    q = levels[rng.integers(0, 3, size=(6, 20, 21, 7))]
    p = pt.compress_soft(q)
    assert p is not None
    np.testing.assert_array_equal(p.levels, np.sort(levels.astype(np.float64)))
    assert _table(p) == _reference(q.astype(np.float64), None)
    # a value the sparse sample misses still gets found (full search)
    q2 = q.copy()
    q2[3, 5, 5, 5] = 0.55
    p2 = pt.compress_soft(q2)
    assert p2 is not None and 0.55 in np.round(p2.levels, 6)
    assert _table(p2) == _reference(q2.astype(np.float64), None)
    # continuous maps: more than max_levels distinct values
    assert pt.compress_soft(rng.random((3, 10, 10)).astype(np.float32)) is None
    assert pt.find_levels(q, max_levels=2) is None


def test_compress_levels_refuses_values_outside_the_levels():
    q = np.array([[0.0, 0.5, 1.0], [0.0, 0.25, 1.0]], dtype=np.float32).reshape(2, 3, 1)
    assert pt.compress_levels(q, np.array([0.0, 0.5, 1.0])) is None
    ok = pt.compress_levels(q, np.array([0.0, 0.25, 0.5, 1.0]))
    assert ok is not None and ok.counts.sum() == 3
