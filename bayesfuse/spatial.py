"""Separable Gaussian bases on a regular grid, with Kronecker algebra.

The robust model's spatial prior (``models/robust_t.md``, section "Spatial
prior") writes the consensus as T~[n] ~ N(W Phi_n + m, Sigma_T I) with L Gaussian
bases centred on a regular (staggered) grid and a constant mean m per link
coordinate (the callers pass mu_T - m to the functions here). On a regular grid of voxels the
bases are separable,

    Phi = Phi_1 (x) Phi_2 (x) ... (x) Phi_d      (N x L, never formed)

with one small matrix Phi_a (n_a x L_a) per axis, so everything the VB needs
reduces to per-axis work:

- ``Phi' x`` and ``Phi w``: mode products (one ``tensordot`` per axis);
- ``Phi' Phi = (x)_a G_a`` with ``G_a = Phi_a' Phi_a = U_a diag(g_a) U_a'``, so
  ``Phi' Phi = U diag(g) U'`` with ``U = (x)_a U_a`` and ``g = (x)_a g_a``;
- ``S_W = (Phi' Phi / Sigma_T + alpha I)^-1 = U diag(1 / (g / Sigma_T + alpha)) U'``,
  hence ``Tr S_W``, ``log|S_W|`` and
  ``sum_n Phi_n' S_W Phi_n = Tr(S_W Phi' Phi)`` are sums over the L
  eigenvalues, and ``mu_W = S_W Phi' mu_T / Sigma_T`` is a scaling in the
  eigenbasis. With ``Psi_a = Phi_a U_a`` the solver never leaves the
  eigenbasis: ``v = U' mu_W = diag(s / Sigma_T) Psi' mu_T`` and the prior
  mean ``Phi mu_W = Psi v`` are one set of mode products each.

Nothing of size N x L or L x L is formed (except by :meth:`KroneckerBasis.dense`,
which exists for tests on tiny grids and refuses large ones).

Geometry: positions along axis a are ``i * step_a`` (``step_a`` = 1 in voxel
units, the voxel size in mm in mm units); centres are
``origin_a + j * spacing_a`` for every integer j with the centre in
``(-spacing_a / 2, extent_a + spacing_a / 2]``, so every voxel lies within half
a spacing of a centre whatever the origin; a basis is
``exp(-(x - c)^2 / (2 width_a^2))``. Defaults: width = spacing, origin =
spacing / 2 (the staggered grid: centres half-way between the spacing's
multiples).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

#: :meth:`KroneckerBasis.dense` refuses more entries than this.
DENSE_LIMIT = 2_000_000


def _per_axis(value, ndim: int, name: str) -> tuple[float, ...]:
    if value is None:
        return (None,) * ndim  # type: ignore[return-value]
    if np.ndim(value) == 0:
        return (float(value),) * ndim
    vals = tuple(float(v) for v in value)
    if len(vals) != ndim:
        raise ValueError(f"{name} needs one value or {ndim} (one per axis), got {len(vals)}")
    return vals


def basis_1d(n: int, spacing: float, width: float | None = None, origin: float | None = None, step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian bases along one axis.

    Parameters
    ----------
    n : int
        Number of voxels along the axis.
    spacing : float
        Distance between centres (same units as ``step``).
    width : float, optional
        Standard deviation of each Gaussian; default ``spacing``.
    origin : float, optional
        Position of the centre with index 0; default ``spacing / 2``.
    step : float
        Distance between voxel centres (1 for voxel units, the voxel size for mm).

    Returns
    -------
    Phi : ndarray (n, L)
    centres : ndarray (L,)
    """
    if not spacing > 0:
        raise ValueError(f"basis spacing must be positive, got {spacing}")
    width = spacing if width is None else float(width)
    if not width > 0:
        raise ValueError(f"basis width must be positive, got {width}")
    origin = spacing / 2 if origin is None else float(origin)
    extent = (n - 1) * step
    # centres in (-spacing / 2, extent + spacing / 2]
    j0 = math.floor((-spacing / 2 - origin) / spacing + 1e-9) + 1
    j1 = math.floor((extent + spacing / 2 - origin) / spacing + 1e-9)
    centres = origin + spacing * np.arange(j0, j1 + 1)
    x = step * np.arange(n)
    Phi = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2)
    return Phi, centres


def mode_product(x: np.ndarray, mats: Sequence[np.ndarray | None], transpose: bool = False, dtype=None) -> np.ndarray:
    """Multiply the trailing ``len(mats)`` axes of ``x`` by one matrix each.

    ``y = x x_1 M_1 x_2 M_2 ...``: axis a of size ``M_a.shape[1]`` becomes
    ``M_a.shape[0]`` (``M_a @`` along that axis), or with ``transpose`` axis a
    of size ``M_a.shape[0]`` becomes ``M_a.shape[1]`` (``M_a' @``). A ``None``
    leaves its axis alone. Leading axes (e.g. classes) are batch axes.

    Each product is a large ``gemm`` on a C-ordered view ``(before, n_a, after)``:
    directly when the axis is the last one or has few predecessors, after
    moving it last (one copy of the operand) otherwise.
    The products run in ``dtype`` (default: float32 for a float32 ``x``,
    float64 otherwise): float32 volumes are contracted by sgemm, about three
    times faster than dgemm and without a float64 copy of the volume.
    """
    d = len(mats)
    work = np.dtype(dtype) if dtype is not None else (np.dtype(np.float32) if x.dtype == np.float32 else np.dtype(np.float64))
    y = np.ascontiguousarray(x, dtype=work)
    lead = y.ndim - d

    def out_size(a):
        M = mats[a]
        return M.shape[1] if transpose else M.shape[0]

    # Order: shrink first by the smallest output, grow last by the smallest
    # output; the volume-sized product then has the fewest columns.
    axes = [a for a in range(d) if mats[a] is not None]
    shrinking = sum(out_size(a) for a in axes) <= sum(y.shape[lead + a] for a in axes)
    axes.sort(key=out_size, reverse=not shrinking)
    for a in axes:
        M = mats[a]
        A = (M if transpose else M.T).astype(work, copy=False)  # (n_a, m_a): contract axis a with A's rows
        shape = y.shape
        n, m = A.shape
        before = int(np.prod(shape[: lead + a]))
        after = int(np.prod(shape[lead + a + 1 :]))
        y3 = y.reshape(before, n, after)
        if after == 1:
            z = y3[:, :, 0] @ A
        elif before <= 8:
            # a few large products (the leading axis): one gemm each
            z = np.empty((before, m, after), dtype=work)
            for b in range(before):
                np.matmul(A.T, y3[b], out=z[b])
        else:
            # many small products: move the axis last and make it one large
            # gemm (threaded BLAS on a stack of small matrices can stall
            # badly on a busy machine; one large gemm does not)
            t = np.ascontiguousarray(y3.transpose(0, 2, 1)).reshape(before * after, n) @ A
            z = np.ascontiguousarray(t.reshape(before, after, m).transpose(0, 2, 1))
        y = z.reshape(shape[: lead + a] + (m,) + shape[lead + a + 1 :])
    return y


def _in_threads(fn, items, threads: int) -> list:
    """[fn(item) for item in items], on up to ``threads`` threads (numpy's products release the GIL)."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(it) for it in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as ex:
        return list(ex.map(fn, items))


def _column_tasks(n_lead: int, cols: int, threads: int) -> list[tuple[int, int, int]]:
    """(leading index, first column, end column): each leading index's columns cut into enough
    contiguous ranges that there are at least ``threads`` tasks."""
    parts = max(1, min(cols, -(-threads // max(n_lead, 1))))
    edges = np.linspace(0, cols, parts + 1).round().astype(int)
    return [(k, int(edges[i]), int(edges[i + 1])) for k in range(n_lead) for i in range(parts) if edges[i + 1] > edges[i]]


#: The first axis's products over the volume (:meth:`KroneckerBasis.expand_eig_into`,
#: :meth:`KroneckerBasis.project_difference_eig`, and the robust model's D = 2 pass) take
#: Phi_0 as banded: an entry below BAND_TINY of Phi_0's largest entry is left out. With
#: width >= spacing / 2 every row's largest entry is near Phi_0's largest (within e^-0.5), so
#: each term left out is below about 2e-17 of the largest term of its sum, under the rounding
#: of the dense sum itself (L_0 terms, about 1e-15 of the largest); much narrower bases make
#: the bound relative to the row's own largest entry weaker (3e-14 at width 0.5, spacing 4),
#: still far below float32 storage's rounding. The products cost about half the dense ones
#: (Gaussians of width = spacing reach 1e-17 at 8.9 widths: 19-22 of 45 bases for a group
#: of 8 voxel rows at spacing 4).
BAND_TINY = 1e-17
#: Voxels along the first axis per group of the expansion's banded product, and bases per
#: group of the projection's: small enough that a group's band is much narrower than L_0,
#: large enough that each product is still a reasonable BLAS call.
BAND_ROWS = 16
BAND_BASES = 8


def row_bands(Phi: np.ndarray, rows: int, tiny: float = BAND_TINY) -> list[tuple[int, int, int, int]]:
    """Groups of ``rows`` consecutive rows of ``Phi`` with the columns where any is not tiny:
    (first row, end row, first column, end column), covering every row."""
    keep = Phi > tiny * np.abs(Phi).max()
    out = []
    for a in range(0, Phi.shape[0], rows):
        b = min(Phi.shape[0], a + rows)
        cols = np.flatnonzero(keep[a:b].any(axis=0))
        lo, hi = (int(cols[0]), int(cols[-1]) + 1) if cols.size else (0, 0)
        out.append((a, b, lo, hi))
    return out


def column_bands(Phi: np.ndarray, cols: int, tiny: float = BAND_TINY) -> list[tuple[int, int, int, int]]:
    """Groups of ``cols`` consecutive columns of ``Phi`` with the rows where any is not tiny:
    (first column, end column, first row, end row), covering every column."""
    return [(lo, hi, a, b) for lo, hi, a, b in row_bands(Phi.T, cols, tiny)]


@dataclass(frozen=True)
class KroneckerBasis:
    """Separable Gaussian bases on a regular grid (see the module docstring).

    Build with :meth:`create`. Attributes hold the per-axis matrices ``Phi``
    (n_a x L_a), the eigenvalues ``g`` and eigenvectors ``U`` of
    ``G_a = Phi_a' Phi_a``, and the centres.
    """

    shape: tuple[int, ...]
    Phi: tuple[np.ndarray, ...]
    centres: tuple[np.ndarray, ...]
    g: tuple[np.ndarray, ...]
    U: tuple[np.ndarray, ...]
    Psi: tuple[np.ndarray, ...]  # Phi_a U_a: the bases rotated into the eigenbasis

    @classmethod
    def create(
        cls,
        shape: Sequence[int],
        spacing: float | Sequence[float] = 4.0,
        width: float | Sequence[float] | None = None,
        origin: float | Sequence[float] | None = None,
        voxel_size: Sequence[float] | None = None,
        units: str = "voxel",
    ) -> "KroneckerBasis":
        """Bases for a grid of ``shape``.

        Parameters
        ----------
        shape : sequence of int
            The grid (spatial shape).
        spacing, width, origin : float or one per axis
            In ``units``. Defaults: width = spacing, origin = spacing / 2.
        voxel_size : sequence of float, optional
            Voxel size in mm per axis (for ``units="mm"``).
        units : {"voxel", "mm"}
        """
        shape = tuple(int(s) for s in shape)
        nd = len(shape)
        if units not in ("voxel", "mm"):
            raise ValueError(f"basis units must be 'voxel' or 'mm', not {units!r}")
        steps = (1.0,) * nd if units == "voxel" else _per_axis(voxel_size if voxel_size is not None else 1.0, nd, "voxel_size")
        sp, wd, og = _per_axis(spacing, nd, "spacing"), _per_axis(width, nd, "width"), _per_axis(origin, nd, "origin")
        phis, cents, gs, us = [], [], [], []
        for a in range(nd):
            Phi, c = basis_1d(shape[a], sp[a], wd[a], og[a], steps[a])
            g, U = np.linalg.eigh(Phi.T @ Phi)
            phis.append(Phi)
            cents.append(c)
            gs.append(np.clip(g, 0.0, None))  # eigh may return -1e-17 for a PSD Gram matrix
            us.append(U)
        return cls(shape, tuple(phis), tuple(cents), tuple(gs), tuple(us), tuple(P @ U for P, U in zip(phis, us)))

    # --------------------------------------------------------------- sizes
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def basis_shape(self) -> tuple[int, ...]:
        return tuple(p.shape[1] for p in self.Phi)

    @property
    def n_basis(self) -> int:
        """L, the number of bases."""
        return int(np.prod(self.basis_shape))

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    # ------------------------------------------------------------ products
    def project(self, x: np.ndarray) -> np.ndarray:
        """Phi' x: (..., *shape) -> (..., *basis_shape), returned in float64.

        A float32 ``x`` is contracted in float32 (see :func:`mode_product`).
        """
        return mode_product(x, self.Phi, transpose=True).astype(np.float64, copy=False)

    def expand(self, w: np.ndarray, dtype=np.float64) -> np.ndarray:
        """Phi w: (..., *basis_shape) -> (..., *shape), computed and returned in ``dtype``."""
        return mode_product(np.asarray(w), self.Phi, dtype=dtype)

    def project_eig(self, x: np.ndarray, dtype=None, slab_voxels: int = 1 << 20) -> np.ndarray:
        """U' Phi' x = Psi' x: the projection in the eigenbasis, in one set of mode products.

        Parameters
        ----------
        x : ndarray (..., *shape)
        dtype : optional
            Precision of the products (default as :func:`mode_product`:
            float32 for a float32 ``x``). ``np.float64`` with a float32 ``x``
            contracts slabs along the first axis, each converted to float64
            on its own, so no float64 copy of the whole volume is made.
            A float32 contraction of N voxels carries a relative error of
            order 1e-7 of sum |x|; the robust model's ELBO subtracts this
            projection from sums of squares of the same size and must not.
        slab_voxels : int
            Voxels (times leading entries) per slab in the float64 path.

        Returns
        -------
        ndarray (..., *basis_shape), float64
        """
        work = np.dtype(dtype) if dtype is not None else None
        if work is None or x.dtype == work or self.ndim == 1:
            return mode_product(x, self.Psi, transpose=True, dtype=work).astype(np.float64, copy=False)
        lead = x.shape[: x.ndim - self.ndim]
        per_row = max(1, int(np.prod(x.shape[len(lead) + 1 :])) * int(np.prod(lead)))
        step = max(1, slab_voxels // per_row)
        out = None
        P0 = self.Psi[0].astype(work, copy=False)
        for i0 in range(0, self.shape[0], step):
            # the other axes first (they shrink the slab), then this slab's rows of Psi_0
            part = mode_product(x[..., i0 : i0 + step, *([slice(None)] * (self.ndim - 1))],
                                (None,) + self.Psi[1:], transpose=True, dtype=work)
            contrib = np.tensordot(part, P0[i0 : i0 + step], axes=([len(lead)], [0]))
            contrib = np.moveaxis(contrib, -1, len(lead))
            out = contrib if out is None else out + contrib
        return out

    def expand_eig_into(self, v: np.ndarray, add, out: np.ndarray, chunk: int = 4096, threads: int = 1) -> None:
        """out = Phi U v + add = Psi v + add (v = U' w: eigenbasis coordinates), computed in
        float64 and cast as it is written to ``out``.

        ``v`` is (..., *basis_shape), ``add`` a scalar or one value per leading
        index, ``out`` (..., *shape). The products along every axis but the
        first run on the small (L_0, n_1, ...) stack; the first axis's, which
        makes the volume, runs ``chunk`` columns at a time into a reused
        float64 buffer, so no volume-sized temporary is allocated (and
        page-faulted) per call. With ``threads`` > 1 the leading indices and
        column ranges run on that many threads, each product on one BLAS
        thread if the caller limits BLAS to one (see ``robust_t.solve``).
        """
        v = np.asarray(v, dtype=np.float64)
        lead = v.shape[: v.ndim - self.ndim]
        n0 = self.shape[0]
        # Psi_0 v = Phi_0 (U_0 v): U_0 and the other axes on the small stack, the banded Phi_0 on the volume
        Ys = self.expand_rest_eig(v, threads).reshape(-1, self.basis_shape[0], self.n_voxels // n0)
        O = out.reshape((Ys.shape[0], n0, -1))
        adds = np.broadcast_to(np.asarray(add, dtype=np.float64), lead).reshape(-1)
        cols = O.shape[2]
        bands = self._row_bands

        def run(task):
            k, c_lo, c_hi = task
            buf = np.empty((n0, min(chunk, c_hi - c_lo)))
            for c0 in range(c_lo, c_hi, chunk):
                w = min(chunk, c_hi - c0)
                for (a, b, lo, hi), P in bands:
                    np.matmul(P, Ys[k][lo:hi, c0 : c0 + w], out=buf[a:b, :w])
                np.add(buf[:, :w], adds[k], out=O[k, :, c0 : c0 + w], casting="unsafe")

        _in_threads(run, _column_tasks(Ys.shape[0], cols, threads), threads)

    def expand_rest_eig(self, v: np.ndarray, threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """Psi v but for the first axis's Phi_0: (U_0 v) x_1 Psi_1 x_2 Psi_2 ..., float64.

        ``v`` is (..., *basis_shape); returns (..., L_0, n_1 * n_2 * ...). The
        prior mean is then Phi_0 times this along the first axis, a product
        over the volume that the caller takes (banded, see ``row_bands``).
        Memory a thread allocates stays in its malloc arena, so the buffers
        are made here and the leading indices run on ``threads`` threads.
        ``out``: a float64 array of the result's size to write into (reused
        between calls, it is not page-faulted again).
        """
        v = np.asarray(v, dtype=np.float64)
        lead = v.shape[: v.ndim - self.ndim]
        L0 = self.basis_shape[0]
        V = v.reshape((-1, L0, self.n_basis // L0))
        V = np.matmul(self.U[0], V).reshape((-1,) + self.basis_shape)
        if out is None:
            out = np.empty(lead + (L0, self.n_voxels // self.shape[0]))
        Ys = out.reshape((V.shape[0], L0) + self.shape[1:])
        tmp = np.empty((V.shape[0],) + self.basis_shape[:-1] + self.shape[-1:]) if self.ndim == 3 else None
        _in_threads(lambda k: self._expand_rest(V[k], Ys[k], None if tmp is None else tmp[k]), range(V.shape[0]), threads)
        return out

    def project_rest_eig(self, acc: np.ndarray, threads: int = 1) -> np.ndarray:
        """Completes Psi' x from Phi_0' x: ``acc`` (..., L_0, n_1 * n_2 * ...) -> (..., *basis_shape), float64.

        The other axes' Psi_a' in ``acc``'s dtype (float32 sgemm for a float32
        ``acc``), then U_0' in float64, all on the small stack.
        """
        lead = acc.shape[:-2]
        L0 = self.basis_shape[0]
        A = acc.reshape((-1, L0) + self.shape[1:])
        dt = acc.dtype
        res = np.empty((A.shape[0],) + self.basis_shape, dtype=dt)
        tmp = np.empty((A.shape[0], L0) + self.shape[1:-1] + self.basis_shape[-1:], dtype=dt) if self.ndim == 3 else None
        _in_threads(lambda k: self._project_rest(A[k], res[k], None if tmp is None else tmp[k]), range(A.shape[0]), threads)
        out = np.matmul(self.U[0].T, res.reshape(A.shape[0], L0, -1).astype(np.float64, copy=False))
        return out.reshape(lead + self.basis_shape)

    def row_band_table(self, rows: int = BAND_ROWS) -> np.ndarray:
        """Phi_0's groups of ``rows`` rows (see :func:`row_bands`) as an int64 (groups, 4) table: a, b, lo, hi."""
        if rows not in self._band_tables:
            self._band_tables[rows] = np.array(row_bands(self.Phi[0], rows), dtype=np.int64).reshape(-1, 4)
        return self._band_tables[rows]

    @cached_property
    def _band_tables(self) -> dict:
        return {}

    def project_difference_eig(self, a: np.ndarray, b: np.ndarray, chunk: int = 4096, threads: int = 1) -> np.ndarray:
        """Psi' (a - b) for float32 volumes (..., *shape), contracted in float32, returned in float64.

        The first axis's product, the one over the whole volume, runs
        ``chunk`` columns at a time on the difference of those columns (a
        reused buffer): no volume-sized temporary of a - b. The other axes
        are then contracted on the smaller (..., L_0, n_1, ...) stack.
        ``threads`` as in :meth:`expand_eig_into`.
        """
        lead = a.shape[: a.ndim - self.ndim]
        n0, L0 = self.shape[0], self.basis_shape[0]
        A = a.reshape((-1, n0, self.n_voxels // n0))
        B = b.reshape(A.shape)
        cols = A.shape[2]
        acc = np.empty((A.shape[0], L0, cols), dtype=np.float32)
        bands = self._column_bands

        def run(task):
            # Psi_0' x = U_0' (Phi_0' x): the banded Phi_0' here, U_0' on the small stack below
            k, c_lo, c_hi = task
            diff = np.empty((n0, min(chunk, c_hi - c_lo)), dtype=np.float32)
            for c0 in range(c_lo, c_hi, chunk):
                w = min(chunk, c_hi - c0)
                np.subtract(A[k, :, c0 : c0 + w], B[k, :, c0 : c0 + w], out=diff[:, :w])
                for (lo, hi, ra, rb), Pt in bands:
                    np.matmul(Pt, diff[ra:rb, :w], out=acc[k, lo:hi, c0 : c0 + w])

        _in_threads(run, _column_tasks(A.shape[0], cols, threads), threads)
        return self.project_rest_eig(acc.reshape(lead + (L0, cols)), threads)

    @cached_property
    def _row_bands(self) -> list:
        """Phi_0's row groups (see :func:`row_bands`) with each group's block, float64, contiguous."""
        P = self.Phi[0]
        return [((a, b, lo, hi), np.ascontiguousarray(P[a:b, lo:hi])) for a, b, lo, hi in self.row_band_table(BAND_ROWS).tolist()]

    @cached_property
    def _column_bands(self) -> list:
        """Phi_0's column groups (see :func:`column_bands`) with each group's block transposed, float32."""
        P = self.Phi[0]
        return [((lo, hi, a, b), np.ascontiguousarray(P[a:b, lo:hi].T, dtype=np.float32))
                for lo, hi, a, b in column_bands(P, BAND_BASES)]

    def _expand_rest(self, v: np.ndarray, out: np.ndarray, tmp: np.ndarray | None) -> None:
        """out = v x_1 Psi_1 x_2 Psi_2 ... (every axis but the first), into given buffers (float64)."""
        if self.ndim == 1:
            out[...] = v
        elif self.ndim == 2:
            np.matmul(v, self.Psi[1].T, out=out)
        elif self.ndim == 3:
            L0, L1, L2 = v.shape
            np.matmul(v.reshape(L0 * L1, L2), self.Psi[2].T, out=tmp.reshape(L0 * L1, -1))
            np.matmul(self.Psi[1], tmp, out=out)
        else:
            out[...] = mode_product(v, (None,) + self.Psi[1:])

    def _project_rest(self, x: np.ndarray, out: np.ndarray, tmp: np.ndarray | None) -> None:
        """out = x x_1 Psi_1' x_2 Psi_2' ... (every axis but the first), in x's dtype, into given buffers."""
        dt = x.dtype
        if self.ndim == 1:
            out[...] = x
        elif self.ndim == 2:
            np.matmul(x, self.Psi[1].astype(dt), out=out)
        elif self.ndim == 3:
            L0, n1, n2 = x.shape
            np.matmul(x.reshape(L0 * n1, n2), self.Psi[2].astype(dt), out=tmp.reshape(L0 * n1, -1))
            np.matmul(self.Psi[1].T.astype(dt), tmp, out=out)
        else:
            out[...] = mode_product(x, (None,) + self.Psi[1:], transpose=True, dtype=dt)

    def rotate(self, w: np.ndarray) -> np.ndarray:
        """U' w: coordinates in the eigenbasis of Phi' Phi."""
        return mode_product(np.asarray(w, dtype=np.float64), self.U, transpose=True)

    def unrotate(self, v: np.ndarray) -> np.ndarray:
        """U v: back from the eigenbasis."""
        return mode_product(np.asarray(v, dtype=np.float64), self.U)

    def gram_eigenvalues(self) -> np.ndarray:
        """g = (x)_a g_a, the eigenvalues of Phi' Phi, shaped ``basis_shape``."""
        out = np.ones(())
        for g in self.g:
            out = np.multiply.outer(out, g)
        return out

    # --------------------------------------------------------- the W block
    def posterior(self, z: np.ndarray, alpha: float, sigma_T: float, eigen: bool = False):
        """q(W) given z = Phi' mu_T (one row per class), alpha and Sigma_T.

        Returns mu_W (same shape as z) and the eigenvalues s of
        S_W = U diag(s) U' (``basis_shape``), s = 1 / (g / Sigma_T + alpha);
        with ``eigen`` also U' mu_W (for :meth:`quad_gram` without another
        rotation).

        References
        ----------
        models/robust_t.md (eq:rt-qW)
        """
        g = self.gram_eigenvalues()
        s = 1.0 / (g / sigma_T + alpha)
        v = self.rotate(z) * (s / sigma_T)
        mu_W = self.unrotate(v)
        return (mu_W, s, v) if eigen else (mu_W, s)

    def quad_gram(self, w: np.ndarray | None = None, v: np.ndarray | None = None) -> float:
        """sum over leading axes of w' Phi' Phi w = sum g (U' w)^2 (or from v = U' w)."""
        v = self.rotate(w) if v is None else v
        return float(np.sum(self.gram_eigenvalues() * v * v))

    def dense(self) -> np.ndarray:
        """Phi as an N x L matrix (C order over axes): tests on tiny grids only."""
        if self.n_voxels * self.n_basis > DENSE_LIMIT:
            raise MemoryError(f"refusing to form a dense {self.n_voxels} x {self.n_basis} basis matrix")
        out = np.ones((1, 1))
        for P in self.Phi:
            out = np.kron(out, P)
        return out

    def sample(self, mu_W: np.ndarray, s: np.ndarray, rng: np.random.Generator, n: int | None = None) -> np.ndarray:
        """Draws W ~ N(mu_W, U diag(s) U'), (n, *mu_W.shape) or one draw when n is None."""
        shape = mu_W.shape if n is None else (n,) + mu_W.shape
        eps = rng.standard_normal(shape)
        return mu_W + self.unrotate(eps * np.sqrt(s))
