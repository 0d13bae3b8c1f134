"""Figures of a fusion result, drawn with matplotlib (Agg) for the HTML report.

Every function takes plain arrays or a :class:`~bayesfuse.result.FusionResult`
and returns a :class:`matplotlib.figure.Figure`; :func:`png_base64` turns one
into the text of a ``data:`` URL. Slices are orthogonal planes through the
structure's centre of mass (not the volume's centre), cropped to the
structure with a margin, drawn in millimetres so that anisotropic voxels keep
their true proportions.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: Margin around the structure's bounding box, as a share of its extent
#: (at least MIN_MARGIN voxels), so that the surroundings stay visible.
MARGIN = 0.6
MIN_MARGIN = 8

#: Colours of the raters' contours (cycled).
RATER_COLOURS = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _plt():
    import sys

    import matplotlib

    # headless by default, but never switch the backend of a session that
    # already drew with pyplot (a Jupyter kernel's inline backend)
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def png_base64(fig, dpi: int = 80) -> str:
    """The figure as base64-encoded PNG (for ``<img src="data:image/png;base64,...">``); closes it."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------ geometry
def centre_of_mass(weight: np.ndarray) -> tuple[int, ...]:
    """Voxel indices of the centre of mass of a non-negative map.

    Falls back to the volume's centre where the map is empty.
    """
    w = np.clip(np.asarray(weight, dtype=np.float64), 0, None)
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        return tuple(s // 2 for s in w.shape)
    idx = []
    for ax in range(w.ndim):
        other = tuple(a for a in range(w.ndim) if a != ax)
        prof = w.sum(axis=other)
        c = float(np.dot(prof, np.arange(w.shape[ax])) / total)
        # The centre of mass of a hollow or curved structure can fall outside
        # it: move to the nearest plane that holds some of it.
        ci = int(round(c))
        nz = np.flatnonzero(prof > 0)
        ci = int(nz[np.argmin(np.abs(nz - ci))])
        idx.append(ci)
    return tuple(idx)


def crop_box(weight: np.ndarray, threshold: float = 0.05) -> tuple[slice, ...]:
    """Bounding box of ``weight > threshold`` grown by :data:`MARGIN` on each side."""
    w = np.asarray(weight)
    on = w > threshold
    if not on.any():
        return tuple(slice(0, s) for s in w.shape)
    box = []
    for ax in range(w.ndim):
        other = tuple(a for a in range(w.ndim) if a != ax)
        nz = np.flatnonzero(on.any(axis=other))
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        pad = max(MIN_MARGIN, int(np.ceil(MARGIN * (hi - lo))))
        box.append(slice(max(0, lo - pad), min(w.shape[ax], hi + pad)))
    return tuple(box)


@dataclass(frozen=True)
class Plane:
    """One orthogonal view: the fixed axis and the axes shown (horizontal, vertical)."""

    name: str
    fixed: int | None
    horizontal: int
    vertical: int


def planes(ndim: int) -> list[Plane]:
    """The views of a 2-D image (one) or a 3-D volume (axial, coronal, sagittal)."""
    if ndim == 2:
        return [Plane("slice", None, 0, 1)]
    return [Plane("axial (z)", 2, 0, 1), Plane("coronal (y)", 1, 0, 2), Plane("sagittal (x)", 0, 1, 2)]


def cut(vol: np.ndarray, plane: Plane, centre: Sequence[int], box: Sequence[slice]) -> np.ndarray:
    """The 2-D section of ``vol`` (spatial dims first) shown in ``plane``, (vertical, horizontal)."""
    sel = list(box)
    if plane.fixed is not None:
        sel[plane.fixed] = int(centre[plane.fixed])
    sec = np.asarray(vol)[tuple(sel)]
    # After fixing one axis the remaining two keep their order (h < v always).
    return np.swapaxes(sec, 0, 1)


def _extent(plane: Plane, box: Sequence[slice], spacing: Sequence[float]) -> list[float]:
    h, v = plane.horizontal, plane.vertical
    return [box[h].start * spacing[h], box[h].stop * spacing[h], box[v].start * spacing[v], box[v].stop * spacing[v]]


# ------------------------------------------------------------------- slices
@dataclass
class Row:
    """One row of a slice grid: a volume and how to colour it."""

    label: str
    volume: np.ndarray
    cmap: Any = "viridis"
    vmin: float | None = None
    vmax: float | None = None
    image: bool = False  # draw as the grey intensity image with the contours on top
    colorbar: str = ""


def slice_grid(
    rows: Sequence[Row],
    centre: Sequence[int],
    box: Sequence[slice],
    spacing: Sequence[float],
    *,
    outline: np.ndarray | None = None,
    contours: Sequence[tuple[str, np.ndarray]] = (),
    title: str = "",
):
    """A grid of orthogonal sections: one row per volume, one column per plane.

    A 2-D image has a single plane: its rows are then laid side by side.

    Parameters
    ----------
    rows : sequence of Row
        The volumes (spatial dims in the result's order).
    centre, box : indices and slices
        Where to cut (see :func:`centre_of_mass`, :func:`crop_box`).
    spacing : sequence of float
        Voxel size (mm), for true proportions.
    outline : ndarray, optional
        A probability map whose 0.5 level is drawn as a thin white line on
        every non-image row (the consensus' boundary, for orientation).
    contours : sequence of (label, map)
        Drawn at level 0.5 on image rows: the consensus and each rater.
    """
    plt = _plt()
    pls = planes(len(spacing))
    aspect = []
    for p in pls:
        w = (box[p.horizontal].stop - box[p.horizontal].start) * spacing[p.horizontal]
        h = (box[p.vertical].stop - box[p.vertical].start) * spacing[p.vertical]
        aspect.append(w / max(h, 1e-9))
    panel_h = 2.6
    side_by_side = len(pls) == 1
    if side_by_side:
        # one row of panels, each followed by its colour bar
        ratios = [a for _ in rows for a in (aspect[0], 0.06)]
        fig, grid = plt.subplots(1, 2 * len(rows), figsize=(panel_h * aspect[0] * len(rows) + 1.2 * len(rows), panel_h + 0.6 * bool(title)),
                                 gridspec_kw={"width_ratios": ratios}, squeeze=False)
        slots = [([grid[0, 2 * r]], grid[0, 2 * r + 1]) for r in range(len(rows))]
    else:
        fig, grid = plt.subplots(len(rows), len(pls) + 1, figsize=(panel_h * sum(aspect) + 1.6, panel_h * len(rows) + 0.6 * bool(title)),
                                 gridspec_kw={"width_ratios": [*aspect, 0.06]}, squeeze=False)
        slots = [(list(grid[r, :-1]), grid[r, -1]) for r in range(len(rows))]
    for r, (row, (axes, cax)) in enumerate(zip(rows, slots)):
        vol = np.asarray(row.volume, dtype=np.float32)
        vmin = row.vmin if row.vmin is not None else float(np.nanmin(vol))
        vmax = row.vmax if row.vmax is not None else float(np.nanmax(vol))
        if vmax <= vmin:
            vmax = vmin + 1e-6
        im = None
        for c, (p, ax) in enumerate(zip(pls, axes)):
            ext = _extent(p, box, spacing)
            im = ax.imshow(cut(vol, p, centre, box), cmap="gray" if row.image else row.cmap, vmin=vmin, vmax=vmax,
                           origin="lower", extent=ext, interpolation="nearest")
            lines = contours if row.image else ([("consensus", outline)] if outline is not None else [])
            for i, (lab, m) in enumerate(lines):
                sec = cut(m, p, centre, box)
                if np.nanmin(sec) < 0.5 < np.nanmax(sec):
                    is_cons = lab == "consensus"
                    colour = ("red" if row.image else "white") if is_cons else RATER_COLOURS[(i - 1) % len(RATER_COLOURS)]
                    ax.contour(sec, levels=[0.5], colors=[colour], linewidths=1.6 if is_cons else 0.9,
                               extent=ext, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if side_by_side:
                ax.set_title(row.label, fontsize=9)
            else:
                if r == 0:
                    fixed = "" if p.fixed is None else f" {'xyz'[p.fixed]} = {centre[p.fixed]}"
                    ax.set_title(f"{p.name}{fixed}", fontsize=9)
                if c == 0:
                    ax.set_ylabel(row.label, fontsize=9)
        if row.image:
            cax.set_axis_off()
            if contours:
                handles = [plt.Line2D([], [], color="red" if lab == "consensus" else RATER_COLOURS[(i - 1) % len(RATER_COLOURS)],
                                      lw=1.6 if lab == "consensus" else 0.9, label=_short(lab, 18)) for i, (lab, _) in enumerate(contours)]
                cax.legend(handles=handles, loc="center left", fontsize=7, frameon=False, bbox_to_anchor=(0, 0.5))
        else:
            cb = fig.colorbar(im, cax=cax)
            cb.ax.tick_params(labelsize=7)
            if row.colorbar:
                cb.set_label(row.colorbar, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def label_cmap(k: int):
    """A discrete colour map of K classes (use with vmin=-0.5, vmax=K-0.5)."""
    from matplotlib.colors import ListedColormap

    _plt()
    import matplotlib

    base = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    return ListedColormap([base(i % base.N) for i in range(k)], name=f"labels{k}")


# --------------------------------------------------------------- rater plots
def rater_bars(
    names: Sequence[str],
    values: dict[str, np.ndarray],
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    mass: float | None = None,
):
    """Horizontal bars of per-rater estimates, one panel per quantity.

    ``intervals[name] = (lo, hi)`` draws error bars; quantities without one
    are drawn as point estimates and say so in the panel title.
    """
    plt = _plt()
    intervals = intervals or {}
    n = len(values)
    ncol = min(3, n)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 0.35 * len(names) * nrow + 1.2 * nrow), squeeze=False)
    y = np.arange(len(names))
    for i, (name, vals) in enumerate(values.items()):
        ax = axes[i // ncol, i % ncol]
        vals = np.asarray(vals, dtype=float)
        colours = [RATER_COLOURS[j % len(RATER_COLOURS)] for j in range(len(names))]
        ax.barh(y, vals, color=colours, alpha=0.8)
        if name in intervals:
            lo, hi = (np.asarray(a, dtype=float) for a in intervals[name])
            ax.errorbar(vals, y, xerr=[np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)], fmt="none", ecolor="black", capsize=3, lw=1)
            ax.set_title(f"{name} ({100 * (mass or 0.9):g}% interval)", fontsize=9)
        else:
            ax.set_title(f"{name} (point estimate)", fontsize=9)
        ax.set_yticks(y)
        ax.set_yticklabels([_short(s) for s in names] if i % ncol == 0 else [], fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for j in range(n, nrow * ncol):
        axes[j // ncol, j % ncol].set_axis_off()
    fig.tight_layout()
    return fig


def _short(name: str, n: int = 22) -> str:
    return name if len(name) <= n else "\u2026" + name[-(n - 1):]


def heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str = "", vmin=0.0, vmax=1.0):
    """A small annotated matrix (e.g. responsibilities, rater x component)."""
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * m.shape[1], 0.8 + 0.32 * m.shape[0]))
    im = ax.imshow(m, cmap="Blues", vmin=vmin, vmax=vmax, aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if m[i, j] > 0.6 * vmax else "black")
    ax.set_xticks(range(m.shape[1]))
    ax.set_xticklabels([str(c) for c in cols], fontsize=7)
    ax.set_yticks(range(m.shape[0]))
    ax.set_yticklabels([_short(r) for r in rows], fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def objective_trace(objective: np.ndarray, name: str = "objective", stage: np.ndarray | None = None):
    """The objective per iteration, and its increments on a log scale.

    Decreases (which a correct VB or EM never makes, beyond rounding) are
    marked in red on the right panel. ``stage`` (one label per iteration)
    marks solvers whose objective changes definition between stages (a
    mixture that adds a component): the stages are separated by dashed lines
    and a step across a boundary is not a decrease.
    """
    plt = _plt()
    obj = np.asarray(objective, dtype=float)
    it = np.arange(1, obj.size + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 2.8))
    a1.plot(it, obj, marker="o", ms=2.5, lw=1)
    a1.set_xlabel("iteration", fontsize=8)
    a1.set_ylabel(_short(name, 40), fontsize=8)
    a1.tick_params(labelsize=7)
    a1.grid(alpha=0.3)
    if obj.size > 1:
        d = np.diff(obj)
        same = np.ones(d.size, bool) if stage is None else (np.asarray(stage)[1:] == np.asarray(stage)[:-1])
        scale = np.maximum(np.abs(obj[1:]), 1e-300)
        rel = np.abs(d) / scale
        up = (d >= 0) & same
        down = (d < 0) & same
        a2.semilogy(it[1:][up], np.maximum(rel[up], 1e-17), "o", ms=3, color="#1f77b4", label="increase")
        if down.any():
            a2.semilogy(it[1:][down], np.maximum(rel[down], 1e-17), "x", ms=5, color="red", label="decrease")
        a2.legend(fontsize=7)
        for ax in (a1, a2):
            for b in it[1:][~same]:
                ax.axvline(b - 0.5, color="grey", ls="--", lw=0.8)
    a2.set_xlabel("iteration", fontsize=8)
    a2.set_ylabel("|relative change|", fontsize=8)
    a2.tick_params(labelsize=7)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    return fig
