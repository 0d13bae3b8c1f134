"""Figures of a cross-check: solver vs NUTS marginals, z-score and sd-ratio maps.

Drawn with matplotlib (Agg) through :mod:`bayesfuse.figures`' slice grids,
so that the maps look like the report's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Elements drawn per variable in the marginals figure.
MAX_PANELS = 6


def _spatial_stats(check) -> tuple[str, object] | None:
    """The first compared variable with spatial dims (the consensus or T~)."""
    sdims = set(check.result.spatial_dims)
    for name, st in check.stats.items():
        if sdims <= set(st["zscore"].dims):
            return name, st
    return None


def _elements(st, k: int) -> list[tuple[int, ...]]:
    """Indices of the k elements to draw: the largest |z| first, then spread."""
    z = np.abs(np.nan_to_num(st["zscore"].values, posinf=1e9))
    order = np.argsort(-z, axis=None)
    pick = list(order[: max(1, k // 2)]) + list(order[:: max(1, order.size // max(1, k - k // 2))][: k - k // 2])
    seen, out = set(), []
    for i in pick:
        if i not in seen:
            seen.add(i)
            out.append(np.unravel_index(i, z.shape))
    return out[:k]


def marginals(check):
    """Histograms of NUTS draws with q's draws (or point) on top, per compared variable."""
    from .figures import _plt

    plt = _plt()
    rows = []
    for name, st in check.stats.items():
        rows.append((name, st))
    ncols = MAX_PANELS
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.3 * ncols, 2.0 * len(rows) + 0.4), squeeze=False)
    post = check.nuts["posterior"]
    qpost = check.q_draws["posterior"] if check.q_draws is not None else None
    for r, (name, st) in enumerate(rows):
        axes_r = axes[r]
        if name not in post:
            # the EM consensus: Bernoulli posteriors, one point per voxel
            ax = axes_r[0]
            wq, wn = st["mean_q"].values.ravel(), st["mean_nuts"].values.ravel()
            cont = check.masks.get("contested")
            c = np.broadcast_to(cont.reshape(cont.shape + (1,) * (st["mean_q"].ndim - cont.ndim)), st["mean_q"].shape).ravel() if cont is not None else np.ones_like(wq, bool)
            ax.scatter(wn[~c], wq[~c], s=6, c="0.7", label="unanimous")
            ax.scatter(wn[c], wq[c], s=8, c="C3", label="contested")
            ax.plot([0, 1], [0, 1], "k-", lw=0.6)
            ax.set_xlabel("p(x=1) with theta from NUTS", fontsize=7)
            ax.set_ylabel("p(x=1) at theta_EM", fontsize=7)
            ax.set_title(f"{name}: label posterior", fontsize=8)
            ax.legend(fontsize=6, frameon=False)
            for ax in axes_r[1:]:
                ax.set_axis_off()
            continue
        nd = post[name].stack(sample=("chain", "draw")).transpose("sample", ...)
        qd = None
        if qpost is not None and name in qpost:
            qd = qpost[name].stack(sample=("chain", "draw")).transpose("sample", ...).transpose(*nd.dims)
        idx = _elements(st, ncols)
        for c, ax in enumerate(axes_r):
            if c >= len(idx):
                ax.set_axis_off()
                continue
            e = idx[c]
            nv = nd.values[(slice(None),) + e]
            ax.hist(nv, bins=40, density=True, color="0.75", label="NUTS")
            if qd is not None and st["sd_q"].values[e] > 1e-9 * max(1.0, abs(float(st["mean_q"].values[e]))):
                ax.hist(qd.values[(slice(None),) + e], bins=40, density=True, histtype="step", color="C0", lw=1.4, label="solver q")
            else:
                ax.axvline(float(st["mean_q"].values[e]), color="C0", lw=1.6, label="solver point")
            coords = ",".join(str(st[d].values[j]) if d in st.coords else str(j) for d, j in zip(st["zscore"].dims, e))
            ax.set_title(f"{name}[{coords}]\nz={float(st['zscore'].values[e]):.2f} sd ratio={float(st['sd_ratio'].values[e]):.2f}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_yticks([])
            if c == 0:
                ax.legend(fontsize=6, frameon=False)
    fig.suptitle(f"{check.method}: solver vs NUTS marginals", fontsize=10)
    fig.tight_layout()
    return fig


def _volume(st, var: str, sdims) -> np.ndarray:
    """A statistic as a spatial volume (for a class dim: the largest |value| over classes)."""
    da = st[var]
    extra = [d for d in da.dims if d not in sdims]
    a = da.transpose(*sdims, *extra).values
    if extra:
        a = a.reshape(a.shape[: len(sdims)] + (-1,))
        pick = np.nanargmax(np.abs(np.nan_to_num(a, nan=0.0, posinf=1e9, neginf=-1e9)), axis=-1)
        a = np.take_along_axis(a, pick[..., None], axis=-1)[..., 0]
    return a


def spatial_map(check, which: str):
    """z-score map (``which="z"``) or log2 sd-ratio map (``"sd_ratio"``) of the per-voxel variable."""
    from .figures import Row, _plt, centre_of_mass, slice_grid

    found = _spatial_stats(check)
    sdims = check.result.spatial_dims
    shape = tuple(check.result.labels.shape)
    box = tuple(slice(0, n) for n in shape)
    cons = check.result.consensus.values
    centre = centre_of_mass(cons if cons.ndim == len(shape) else 1 - check.result.probability.values[..., 0])
    spacing = [float(s) for s in check.result.tree.attrs["spacing"]]
    if found is None:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no per-voxel variable compared", ha="center", va="center")
        ax.set_axis_off()
        return fig
    name, st = found
    if which == "z":
        z = _volume(st, "zscore", sdims)
        rows = [Row(f"{name}: z = (solver - NUTS) / sd_NUTS", np.clip(np.nan_to_num(z, posinf=5, neginf=-5), -3, 3),
                    cmap="RdBu_r", vmin=-3, vmax=3, colorbar="z (clipped to +-3)"),
                Row("solver mean", _volume(st, "mean_q", sdims), cmap="viridis"),
                Row("NUTS mean", _volume(st, "mean_nuts", sdims), cmap="viridis")]
        title = f"{check.method}: z-scores of the solver's posterior means against NUTS"
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            lr = np.log2(_volume(st, "sd_ratio", sdims))
        rows = [Row(f"{name}: log2(sd_solver / sd_NUTS)", np.clip(np.nan_to_num(lr, nan=0.0, posinf=2, neginf=-2), -2, 2),
                    cmap="PuOr", vmin=-2, vmax=2, colorbar="log2 sd ratio (< 0: solver overconfident)"),
                Row("NUTS sd", _volume(st, "sd_nuts", sdims), cmap="magma", vmin=0)]
        title = f"{check.method}: posterior sd of the solver against NUTS"
    return slice_grid(rows, centre, box, spacing, title=title)


def save_all(check, folder: Path) -> list[Path]:
    """Write the figures of :data:`bayesfuse.crosscheck.OUTPUTS` into ``folder``."""
    from .figures import _plt

    plt = _plt()
    out = []
    for name, fig in (("marginals.png", marginals(check)), ("zscore_map.png", spatial_map(check, "z")),
                      ("sd_ratio_map.png", spatial_map(check, "sd_ratio"))):
        path = Path(folder) / name
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        out.append(path)
    return out
