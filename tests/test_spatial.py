"""Kronecker algebra of separable Gaussian bases against dense algebra on tiny grids."""

from __future__ import annotations

import numpy as np
import pytest

from bayesfuse.spatial import BAND_TINY, KroneckerBasis, basis_1d, column_bands, row_bands


@pytest.fixture(params=[(7, 9), (5, 6, 4)], ids=["2d", "3d"])
def kb(request):
    return KroneckerBasis.create(request.param, spacing=(2.0, 3.0, 2.5)[: len(request.param)], width=2.2)


def test_basis_centres_cover_the_axis():
    Phi, c = basis_1d(20, spacing=4.0)
    assert c[0] == 2.0 and np.all(np.diff(c) == 4.0)
    # every voxel within half a spacing of a centre
    x = np.arange(20)
    assert np.abs(x[:, None] - c[None]).min(axis=1).max() <= 2.0
    assert Phi.shape == (20, c.size)
    # another origin gives the same coverage, shifted
    _, c2 = basis_1d(20, spacing=4.0, origin=-1.0)
    assert np.abs(x[:, None] - c2[None]).min(axis=1).max() <= 2.0
    assert np.allclose(np.mod(c2 + 1.0, 4.0), 0)


def test_mm_units_equal_voxel_units_rescaled():
    a = KroneckerBasis.create((10, 12), spacing=3.0, width=2.0, units="voxel")
    b = KroneckerBasis.create((10, 12), spacing=(1.5, 6.0), width=(1.0, 4.0), origin=(0.75, 3.0), voxel_size=(0.5, 2.0), units="mm")
    np.testing.assert_allclose(a.dense(), b.dense(), atol=1e-12)


def test_project_expand_against_dense(kb):
    rng = np.random.default_rng(0)
    Phi = kb.dense()
    x = rng.normal(size=(2,) + kb.shape)
    np.testing.assert_allclose(kb.project(x).reshape(2, -1), x.reshape(2, -1) @ Phi, rtol=1e-10)
    np.testing.assert_allclose(kb.project(x.astype(np.float32)).reshape(2, -1), x.reshape(2, -1) @ Phi, rtol=1e-5, atol=1e-5)
    w = rng.normal(size=(2,) + kb.basis_shape)
    np.testing.assert_allclose(kb.expand(w).reshape(2, -1), w.reshape(2, -1) @ Phi.T, rtol=1e-10)


@pytest.mark.parametrize("shape", [(11,), (7, 9), (5, 6, 4), (3, 4, 5, 2)], ids=["1d", "2d", "3d", "4d"])
@pytest.mark.parametrize("chunk,threads", [(1, 1), (5, 2), (4096, 3)])
def test_chunked_eigenbasis_products_against_dense(shape, chunk, threads):
    """expand_eig_into and project_difference_eig (column chunks on threads, no volume-sized
    temporary) against Psi = Phi U formed densely, for chunks that do and do not divide the
    columns, on one or more threads, with two leading (class) indices."""
    kb = KroneckerBasis.create(shape, spacing=(2.0, 3.0, 2.5, 2.0)[: len(shape)], width=2.2)
    rng = np.random.default_rng(1)
    Ud = np.ones((1, 1))
    for U in kb.U:
        Ud = np.kron(Ud, U)
    Psi = kb.dense() @ Ud  # (N, L)
    v = rng.normal(size=(2,) + kb.basis_shape)
    add = np.array([0.25, -0.5])
    out = np.full((2,) + kb.shape, np.nan, dtype=np.float32)
    kb.expand_eig_into(v, add, out, chunk=chunk, threads=threads)
    # float64 products, rounded once to float32: within half a float32 ulp of the float64 value
    ref = v.reshape(2, -1) @ Psi.T + add[:, None]
    np.testing.assert_allclose(out.reshape(2, -1), ref, rtol=2.0**-24 * (1 + 1e-9), atol=0)
    a = rng.normal(size=(2,) + kb.shape).astype(np.float32)
    b = rng.normal(size=(2,) + kb.shape).astype(np.float32)
    z = kb.project_difference_eig(a, b, chunk=chunk, threads=threads)
    assert z.shape == (2,) + kb.basis_shape and z.dtype == np.float64
    ref = (a.astype(np.float64) - b).reshape(2, -1) @ Psi
    np.testing.assert_allclose(z.reshape(2, -1), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_eigen_structure_against_dense(kb):
    G = kb.dense().T @ kb.dense()
    g = np.sort(kb.gram_eigenvalues().ravel())
    np.testing.assert_allclose(g, np.sort(np.linalg.eigvalsh(G)), atol=1e-9 * g.max())
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3,) + kb.basis_shape)
    np.testing.assert_allclose(kb.unrotate(kb.rotate(w)), w, atol=1e-12)
    wf = w.reshape(3, -1)
    assert kb.quad_gram(w) == pytest.approx(np.einsum("ki,ij,kj->", wf, G, wf), rel=1e-10)


def test_posterior_of_W_against_dense(kb):
    rng = np.random.default_rng(2)
    Phi = kb.dense()
    alpha, sigma_T = 0.7, 0.05
    mu_T = rng.normal(size=(2,) + kb.shape)
    z = kb.project(mu_T)
    mu_W, s = kb.posterior(z, alpha, sigma_T)
    SW = np.linalg.inv(Phi.T @ Phi / sigma_T + alpha * np.eye(kb.n_basis))
    ref = (SW @ Phi.T @ mu_T.reshape(2, -1).T / sigma_T).T
    np.testing.assert_allclose(mu_W.reshape(2, -1), ref, rtol=1e-8, atol=1e-10)
    # traces and log-determinant in the eigenbasis
    g = kb.gram_eigenvalues()
    assert s.sum() == pytest.approx(np.trace(SW), rel=1e-9)
    assert np.sum(g * s) == pytest.approx(np.trace(SW @ Phi.T @ Phi), rel=1e-9)
    # sum_n Phi_n' S_W Phi_n, the term of the Sigma_T update
    assert np.sum(g * s) == pytest.approx(np.einsum("nl,lm,nm->", Phi, SW, Phi), rel=1e-9)
    assert np.log(s).sum() == pytest.approx(np.linalg.slogdet(SW)[1], rel=1e-9)


def test_samples_have_the_posterior_covariance():
    kb = KroneckerBasis.create((6, 5), spacing=2.0)
    mu_W, s = kb.posterior(np.zeros((1,) + kb.basis_shape), alpha=2.0, sigma_T=0.1)
    draws = kb.sample(mu_W, s, np.random.default_rng(3), n=40000)[:, 0].reshape(40000, -1)
    SW = np.linalg.inv(kb.dense().T @ kb.dense() / 0.1 + 2.0 * np.eye(kb.n_basis))
    np.testing.assert_allclose(np.cov(draws.T), SW, atol=0.03 * SW.diagonal().max())


def test_dense_refuses_large_grids():
    kb = KroneckerBasis.create((64, 64, 64), spacing=2.0)
    with pytest.raises(MemoryError):
        kb.dense()


def test_bad_basis_options():
    with pytest.raises(ValueError, match="spacing"):
        KroneckerBasis.create((5, 5), spacing=0.0)
    with pytest.raises(ValueError, match="one per axis"):
        KroneckerBasis.create((5, 5), spacing=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="units"):
        KroneckerBasis.create((5, 5), units="cm")


@pytest.mark.parametrize("n,spacing,width,group", [(180, 4.0, None, 16), (37, 3.0, 7.0, 5), (9, 2.0, None, 16), (60, 4.0, 0.5, 1)])
def test_bands_cover_every_entry_they_leave_out_is_tiny(n, spacing, width, group):
    Phi, _ = basis_1d(n, spacing, width)
    tiny = BAND_TINY * Phi.max()
    # row_bands: (rows a:b, columns lo:hi) of Phi; column_bands: (columns, rows) of Phi, i.e. row bands of Phi'
    for bands, M in ((row_bands(Phi, group), Phi), (column_bands(Phi, group), Phi.T)):
        covered = np.zeros(M.shape, bool)
        starts = [a for a, _, _, _ in bands]
        assert starts == list(range(0, M.shape[0], group)) and bands[-1][1] == M.shape[0]
        for a, b, lo, hi in bands:
            covered[a:b, lo:hi] = True
        assert np.all(M[~covered] <= tiny)
    # at the benchmark's spacing the products are banded: each row group needs about half of the bases
    if (n, spacing, width) == (180, 4.0, None):
        widths = [hi - lo for _, _, lo, hi in row_bands(Phi, group)]
        assert max(widths) < 0.6 * Phi.shape[1]
