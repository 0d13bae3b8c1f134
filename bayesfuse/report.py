"""The HTML report of a fusion result: one self-contained file.

:func:`write_report` writes ``report.html`` beside a result's maps; every
figure is embedded as a base64 PNG and the styles are inline, so the file can
be mailed or archived alone and opens offline. Sections:

- what was fused and how (method, input, geometry, interval kind and mass);
- orthogonal slices through the structure: the image with the consensus' and
  raters' contours, the consensus, its posterior sd, the width of its credible
  interval, its entropy (:mod:`bayesfuse.summaries`);
- every other map of the result: per-rater maps such as the local
  reliability ``tau``, per-component maps of a mixture, others;
- rater performance: bars with intervals where the model has a posterior for
  them, a table of every per-rater estimate, responsibilities of a mixture;
- the objective trace;
- provenance: the command, the configuration, the input files' checksums, and
  the versions of bayesfuse and of the libraries.

Which sections appear follows the result's schema (``bayesfuse.result``), not
the model's name, so a model that lands later gets its report unchanged.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import figures
from .errors import OutputExistsError

log = logging.getLogger(__name__)

#: The report's file name inside the output folder.
REPORT_NAME = "report.html"

#: Libraries whose versions the report records.
LIBRARIES = ("bayesfuse", "numpy", "scipy", "xarray", "pandas", "nibabel", "pymc", "pytensor", "arviz", "nutpie", "matplotlib")

#: Draws used for intervals of per-rater parameters when the model can draw them.
RATER_DRAWS = 400


# ---------------------------------------------------------------- provenance
def versions() -> dict[str, str]:
    """Installed versions of Python and of :data:`LIBRARIES` (``"-"`` if absent)."""
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "-"
    return out


def stamp(result, command: str) -> None:
    """Record the command line and the library versions in the result's attrs.

    Called by ``bayesfuse fuse`` before saving, so that a report made later
    from the saved folder can still say what made the result.
    """
    result.tree.attrs["command"] = command
    result.tree.attrs["versions"] = json.dumps(versions(), sort_keys=True)
    result.tree.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ helpers
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return str(v)
        a = abs(float(v))
        return f"{v:.4g}" if a == 0 or 1e-3 <= a < 1e5 else f"{v:.3e}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    c = f' class="{cls}"' if cls else ""
    # wide tables (many per-rater columns) scroll inside the page instead of overflowing it
    return f'<div class="scroll"><table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _kv_table(pairs: list[tuple[str, Any]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="{cls}"><tbody>{body}</tbody></table>'


def _figure(fig, caption: str, alt: str) -> str:
    b64 = figures.png_base64(fig)
    return (f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _foreground(prob_sk: np.ndarray) -> np.ndarray:
    """Foreground weight (*spatial): p(class 1) for K = 2, 1 - p(background) otherwise."""
    return prob_sk[..., 1] if prob_sk.shape[-1] == 2 else 1.0 - prob_sk[..., 0]


def _reduce_classes(da, sdims) -> np.ndarray:
    """A summary map as (*spatial): as is for K = 2, the max over classes otherwise."""
    v = da.transpose(*sdims, ...).values
    return v if v.ndim == len(sdims) else v.max(axis=-1)


# --------------------------------------------------------------- the report
def render(result, *, data=None, image=None, command: str | None = None, mass: float | None = None, random_seed=0) -> str:
    """The report of a result as one HTML string.

    Parameters
    ----------
    result : FusionResult
        The result (with its summaries in ``/maps``, or they are computed
        here with ``mass``).
    data : RaterMaps, optional
        The input that was fused: its image goes under the slices and the
        raters' contours on top of it.
    image : ndarray, optional
        An intensity image on the result's grid, when ``data`` is not given.
    command : str, optional
        The command line that made the result (default: the one recorded in
        the result's attrs, if any).
    mass : float, optional
        Interval mass for summaries that the result does not hold yet
        (default 0.9).
    """
    from . import summaries

    if summaries.interval_mass(result) is None or "entropy" not in result.group("maps"):
        result = summaries.attach(result, mass if mass is not None else summaries.DEFAULT_MASS, random_seed=random_seed, rules=True)
    mass = summaries.interval_mass(result) or summaries.DEFAULT_MASS
    attrs = result.tree.attrs
    sdims = result.spatial_dims
    spacing = [float(s) for s in attrs.get("spacing", [1.0] * len(sdims))]
    prob = result.probability.transpose(*sdims, "class").values
    fg = _foreground(prob)
    maps = result.group("maps")
    if image is None and data is not None and data.image is not None:
        image = data.image.transpose(*sdims).values
    if image is not None and tuple(np.shape(image)) != tuple(fg.shape):
        log.warning("report: the image's shape %s differs from the result's %s; drawn without it", np.shape(image), fg.shape)
        image = None

    sections: list[str] = []
    sections.append(_overview(result, data, spacing, fg, maps, mass))
    sections.append(_slices_section(result, data, image, spacing, prob, fg, maps, mass))
    sections.append(_other_maps_section(result, spacing, fg, maps))
    sections.append(_raters_section(result, mass, random_seed))
    sections.append(_optimizer_section(result))
    sections.append(_provenance_section(result, command))
    body = "\n".join(s for s in sections if s)
    title = f"bayesfuse report: {result.method}"
    return _PAGE.format(title=_esc(title), body=body)


def write_report(result, out_dir, *, data=None, command: str | None = None, force: bool = False,
                 image=None, mass: float | None = None, name: str = REPORT_NAME) -> Path:
    """Write the report into ``out_dir`` atomically and return its path.

    Raises
    ------
    OutputExistsError
        If the report exists and ``force`` is False (checked before any work).
    """
    from .io import write_text_atomic

    out = Path(out_dir)
    path = out / name
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: exists; use --force to overwrite")
    text = render(result, data=data, image=image, command=command, mass=mass)
    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text)


# ------------------------------------------------------------------ sections
def _overview(result, data, spacing, fg, maps, mass) -> str:
    attrs = result.tree.attrs
    shape = "x".join(str(s) for s in fg.shape)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pairs: list[tuple[str, Any]] = [
        ("method", result.method),
        ("raters", len(result.rater_names)),
        ("input kind", attrs.get("input_kind", "")),
        ("grid", f"{shape} voxels, spacing {' x '.join(f'{s:.4g}' for s in spacing)} mm"),
        ("classes", result.n_classes),
    ]
    post = maps.attrs.get("posterior", "")
    quantity = maps["entropy"].attrs.get("quantity", "") if "entropy" in maps else ""
    if "consensus_sd" in maps:
        quantity = maps["consensus_sd"].attrs.get("quantity", "")
        pairs.append(("posterior summaries", f"{post}: about {quantity}"))
        pairs.append(("credible interval", f"central (equal-tailed), mass {mass:g}"))
    else:
        pairs.append(("posterior summaries", "none: the method is a deterministic rule without a posterior (entropy only)"))
    vol = float(fg.sum()) * voxel_ml
    pairs.append(("consensus volume (sum of probabilities)", f"{vol:.4g} mL"))
    pairs.append(("labelled volume (foreground labels)", f"{float((result.labels.values > 0).sum()) * voxel_ml:.4g} mL"))
    if "consensus_sd" in maps and result.n_classes == 2:
        sd = maps["consensus_sd"].values.astype(np.float64)
        # Voxels are independent under the model's (mean-field or EM) posterior,
        # so the volume's variance is the sum of the voxels' variances.
        pairs.append(("volume sd under the factorised posterior", f"{np.sqrt(np.sum(sd ** 2)) * voxel_ml:.3g} mL (voxels independent under q: a lower bound on the real spread)"))
        width = (maps["consensus_hi"] - maps["consensus_lo"]).values
        pairs.append(("voxels with interval width > 0.5", int((width > 0.5).sum())))
    if "entropy" in maps:
        pairs.append(("mean entropy where the consensus > 0.05", f"{float(maps['entropy'].values[fg > 0.05].mean()) if (fg > 0.05).any() else 0.0:.4g} nats"))
    return f'<section id="overview"><h2>Overview</h2>{_kv_table(pairs)}</section>'


def _slices_section(result, data, image, spacing, prob, fg, maps, mass) -> str:
    sdims = result.spatial_dims
    centre = figures.centre_of_mass(fg)
    weight = fg.copy()
    if "consensus_hi" in maps:
        weight = np.maximum(weight, _reduce_classes(maps["consensus_hi"], sdims))
    box = figures.crop_box(weight)
    k = result.n_classes
    contours: list[tuple[str, np.ndarray]] = [("consensus", fg)]
    if data is not None and tuple(data.shape) == tuple(fg.shape):
        try:
            rater_fg = data.probabilities()
            rater_fg = rater_fg[..., 1] if k == 2 else 1.0 - rater_fg[..., 0]
            contours += [(name, rater_fg[i]) for i, name in enumerate(data.rater_names)]
        except Exception as exc:  # a view that does not apply: draw without the raters
            log.info("report: raters' contours left out (%s)", exc)
    rows = []
    if image is not None:
        lo, hi = np.percentile(image[tuple(figures.crop_box(weight))], [1, 99])
        rows.append(figures.Row("image", image, vmin=float(lo), vmax=float(hi), image=True))
    if k == 2:
        rows.append(figures.Row("consensus p", fg, cmap="magma", vmin=0, vmax=1, colorbar="probability"))
    else:
        rows.append(figures.Row("labels", result.labels.transpose(*sdims).values, cmap=figures.label_cmap(k), vmin=-0.5, vmax=k - 0.5, colorbar="class"))
        rows.append(figures.Row("max_k p", prob.max(axis=-1), cmap="magma", vmin=0, vmax=1, colorbar="probability"))
    which = "" if k == 2 else " (max over classes)"
    if "consensus_sd" in maps:
        sd = _reduce_classes(maps["consensus_sd"], sdims)
        rows.append(figures.Row("posterior sd" + which, sd, cmap="viridis", vmin=0, vmax=max(float(sd.max()), 1e-6), colorbar="sd"))
    if "consensus_lo" in maps and "consensus_hi" in maps:
        width = (maps["consensus_hi"] - maps["consensus_lo"]).transpose(*sdims, ...).values
        width = width if width.ndim == len(sdims) else width.max(axis=-1)
        rows.append(figures.Row(f"{100 * mass:g}% interval width" + which, width, cmap="cividis", vmin=0,
                                vmax=max(float(width.max()), 1e-6), colorbar="hi - lo"))
    if "entropy" in maps:
        rows.append(figures.Row("entropy", maps["entropy"].transpose(*sdims).values, cmap="inferno", vmin=0, vmax=float(np.log(k)), colorbar="nats"))
    fig = figures.slice_grid(rows, centre, box, spacing, outline=fg if k == 2 else None, contours=contours)
    quantity = maps["consensus_sd"].attrs.get("quantity", "") if "consensus_sd" in maps else ""
    if len(sdims) == 3:
        cap = (f"Orthogonal sections through the consensus' centre of mass (voxel {tuple(int(c) for c in centre)}), "
               f"cropped to the structure with a margin; millimetre proportions. ")
    else:
        cap = "The image plane, cropped to the structure with a margin; millimetre proportions. "
    if image is not None:
        cap += (("Top row" if len(sdims) == 3 else "First panel") + ": the image, with the consensus' 0.5 contour in red"
                + (" and each rater's in colour" if len(contours) > 1 else "") + ". ")
    if quantity:
        cap += (f"The sd and the {100 * mass:g}% central credible interval are about {_esc(quantity)}. ")
    cap += "The white line marks the consensus' 0.5 level." if k == 2 else ""
    return f'<section id="consensus"><h2>Consensus and its uncertainty</h2>{_figure(fig, cap, "consensus slices")}</section>'


def _other_maps_section(result, spacing, fg, maps) -> str:
    from .summaries import SUMMARY_MAPS

    sdims = result.spatial_dims
    centre = figures.centre_of_mass(fg)
    box = figures.crop_box(fg)
    parts = []
    plain = []
    for v, da in maps.data_vars.items():
        if v in SUMMARY_MAPS:
            continue
        extra = [d for d in da.dims if d not in sdims]
        if not extra:
            plain.append((v, da.transpose(*sdims).values))
            continue
        if len(extra) != 1:
            continue
        d = extra[0]
        arr = da.transpose(*sdims, d)
        labels = [str(c) for c in (arr[d].values if d in arr.coords else range(arr.sizes[d]))]
        vals = arr.values
        finite = vals[np.isfinite(vals)]
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
        if v == "tau":
            vmin = 0.0
        rows = [figures.Row(figures._short(lab, 18), vals[..., i], cmap="RdYlBu" if v == "tau" else "viridis", vmin=vmin, vmax=vmax, colorbar=v)
                for i, lab in enumerate(labels)]
        fig = figures.slice_grid(rows, centre, box, spacing, outline=fg if result.n_classes == 2 else None)
        if v == "tau":
            title = "Local rater reliability (tau)"
            cap = ("Posterior mean E[tau] of each rater's local precision scale on the same sections: "
                   "low values (red) mark where a rater departs locally from the consensus (an outlier region), "
                   "values near 1 or above (blue) where it agrees.")
        else:
            title = f"{v} (per {d})"
            cap = f"Map <code>{_esc(v)}</code> of the result, one row per {_esc(d)}, on the same sections."
        parts.append(f'<section id="map-{_esc(v)}"><h2>{_esc(title)}</h2>{_figure(fig, cap, v + " slices")}</section>')
    if plain:
        rows = [figures.Row(v, a, cmap="viridis") for v, a in plain]
        fig = figures.slice_grid(rows, centre, box, spacing, outline=fg if result.n_classes == 2 else None)
        names = ", ".join(f"<code>{_esc(v)}</code>" for v, _ in plain)
        parts.append(f'<section id="maps-other"><h2>Other maps</h2>{_figure(fig, "Maps of the result: " + names + ".", "other maps")}</section>')
    return "\n".join(parts)


def rater_draws(result, random_seed=0):
    """Posterior draws of the per-rater parameters, or None where the model has none.

    Uses ``result.posterior_draws`` on a single voxel (per-rater parameters do
    not depend on the region) and keeps the drawn variables whose dims are
    (chain, draw, rater) and whose name is also a variable of ``/raters``.
    """
    raters = result.group("raters")
    if not raters.data_vars:
        return None
    try:
        centre = tuple(int(s) // 2 for s in result.labels.shape)
        region = {d: slice(c, c + 1) for d, c in zip(result.spatial_dims, centre)}
        tree = result.posterior_draws(n=RATER_DRAWS, region=region, random_seed=random_seed)
    except NotImplementedError:
        return None
    except Exception as exc:  # a model's draws failing must not cost the whole report
        log.warning("report: no intervals for the raters' parameters (%s: %s)", type(exc).__name__, exc)
        return None
    post = tree["posterior"].to_dataset() if "posterior" in tree.children else tree.to_dataset()
    keep = [v for v, da in post.data_vars.items() if v in raters and set(da.dims) == {"chain", "draw", "rater"}]
    if not keep:
        return None
    import xarray as xr

    return xr.DataTree.from_dict({"/posterior": post[keep]})


def rater_intervals(draws, mass: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Central intervals (lo, hi) per rater of every variable of :func:`rater_draws`."""
    if draws is None:
        return {}
    post = draws["posterior"].to_dataset()
    a = (1 - mass) / 2
    out = {}
    for v, da in post.data_vars.items():
        q = da.quantile([a, 1 - a], dim=("chain", "draw")).transpose("quantile", "rater").values
        out[v] = (q[0], q[1])
    return out


def _forest(draws, mass: float):
    """ArviZ's forest plot of the per-rater draws (50% and ``mass`` intervals)."""
    import arviz_plots as azp

    figures._plt()
    pc = azp.plot_forest(draws, backend="matplotlib", combined=True, ci_probs=[0.5, mass])
    fig = pc.viz["figure"].item()
    n = sum(da.sizes["rater"] for da in draws["posterior"].to_dataset().data_vars.values())
    fig.set_size_inches(8, 0.9 + 0.3 * n)
    return fig


def _raters_section(result, mass, random_seed) -> str:
    names = result.rater_names
    df = result.raters
    parts = ['<section id="raters"><h2>Raters</h2>']
    raters = result.group("raters")
    # bars for real-valued estimates; integer ones (e.g. an assigned component) stay in the table
    one_d = {v: da.values for v, da in raters.data_vars.items() if da.dims == ("rater",) and np.issubdtype(da.dtype, np.floating)}
    draws = rater_draws(result, random_seed) if one_d else None
    intervals = rater_intervals(draws, mass or 0.9)
    if one_d:
        fig = figures.rater_bars(names, one_d, intervals, mass=mass or 0.9)
        cap = "Per-rater estimates" + (
            f"; error bars: central {100 * (mass or 0.9):g}% intervals from the model's posterior draws" if intervals else
            "; no interval: the model's posterior draws hold none of these quantities")
        parts.append(_figure(fig, cap + ".", "rater performance"))
    if draws is not None:
        approx = draws["posterior"].attrs.get("approximation", "")
        cap = (f"ArviZ forest plot (<code>arviz_plots.plot_forest</code>) of {RATER_DRAWS} posterior draws of the "
               f"per-rater parameters: median, 50% and {100 * (mass or 0.9):g}% intervals"
               + (f"; draws: {_esc(approx)}" if approx else "") + ".")
        try:
            parts.append(_figure(_forest(draws, mass or 0.9), cap, "rater posterior forest plot"))
        except Exception as exc:  # ArviZ's plotting API moves; the bars above carry the same intervals
            log.warning("report: ArviZ forest plot left out (%s: %s)", type(exc).__name__, exc)
    for v, da in raters.data_vars.items():
        if da.ndim == 2 and da.dims[0] == "rater" and da.dims[1] == "component":
            comps = [str(c) for c in (da["component"].values if "component" in da.coords else range(da.sizes["component"]))]
            fig = figures.heatmap(da.values, names, comps, title=f"{v} (rater x component)")
            parts.append(_figure(fig, f"<code>{_esc(v)}</code>: each rater's share in each consensus component.", f"{v} heatmap"))
    if len(df.columns):
        header = ["rater", *df.columns]
        rows = []
        for name, row in df.iterrows():
            cells = [name]
            for c in df.columns:
                val = row[c]
                if c in intervals:
                    i = names.index(name)
                    cells.append(f"{_fmt(val)} [{_fmt(intervals[c][0][i])}, {_fmt(intervals[c][1][i])}]")
                else:
                    cells.append(val)
            rows.append(cells)
        note = f" (brackets: central {100 * (mass or 0.9):g}% interval)" if intervals else ""
        parts.append(f"<h3>Per-rater estimates{_esc(note)}</h3>")
        parts.append(_table(header, rows, cls="raters"))
    else:
        parts.append("<p>The method estimates nothing per rater.</p>")
    parts.append("</section>")
    return "".join(parts)


def _optimizer_section(result) -> str:
    if "optimizer" not in result.tree.children:
        return ""
    opt = result.tree["optimizer"]
    a = opt.attrs
    name = a.get("objective_name", "objective")
    conv = {1: "yes", 0: "no", -1: "-"}.get(int(a.get("converged", -1)), "-")
    pairs = [("objective", name), ("iterations", a.get("iterations", result.n_iter)), ("converged", conv),
             ("stop reason", a.get("stop_reason", "")), ("seconds", a.get("seconds", "-"))]
    obj = result.objective
    stage = opt["stage"].values if "stage" in opt.dataset else None
    if obj.size:
        pairs.append((f"final {name}", float(obj[-1])))
        d = np.diff(obj)
        if stage is not None:
            # the objective changes definition between stages: only steps within one count
            d = d[stage[1:] == stage[:-1]]
        pairs.append(("largest decrease" + (" within a stage" if stage is not None else ""),
                      float(-d.min()) if d.size and d.min() < 0 else 0.0))
    out = [f'<section id="optimizer"><h2>Solver</h2>{_kv_table(pairs)}']
    if obj.size:
        fig = figures.objective_trace(obj, name, stage)
        out.append(_figure(fig, f"The {_esc(name)} at every iteration (left) and its relative change (right); "
                                "a VB or EM solver never decreases it beyond rounding (decreases in red)"
                                + ("; dashed lines separate the solver's stages" if stage is not None else "") + ".",
                           "objective trace"))
    out.append("</section>")
    return "".join(out)


def _provenance_section(result, command: str | None) -> str:
    attrs = result.tree.attrs
    cmd = command or attrs.get("command", "")
    fit_versions = json.loads(attrs["versions"]) if "versions" in attrs else {}
    now = versions()
    libs = sorted(set(fit_versions) | set(now), key=lambda s: (s != "bayesfuse", s != "python", s))
    rows = [[lib, fit_versions.get(lib, attrs.get("bayesfuse_version", "-") if lib == "bayesfuse" else "-"), now.get(lib, "-")] for lib in libs]
    parts = ['<section id="provenance"><h2>Provenance</h2>']
    parts.append(f"<h3>Command</h3><pre>{_esc(cmd) if cmd else '(not recorded: the result was made from Python)'}</pre>")
    pairs = [("created", attrs.get("created", "-")), ("report written", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
             ("input checksum (sha256 of the maps)", attrs.get("input_checksum", "-"))]
    parts.append(_kv_table(pairs))
    files = json.loads(attrs["input_files"]) if "input_files" in attrs else {}
    if files:
        parts.append("<h3>Input files</h3>" + _table(["file", "sha256"], [[k, v] for k, v in sorted(files.items())], cls="files"))
    parts.append("<h3>Versions</h3>" + _table(["package", "at fit time", "at report time"], rows, cls="versions"))
    try:
        cfg = json.dumps(result.config, indent=2, sort_keys=True)
    except (KeyError, ValueError):
        cfg = "{}"
    parts.append(f"<h3>Configuration</h3><pre>{_esc(cfg)}</pre></section>")
    return "".join(parts)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }}
h1 {{ font-size: 1.5em; border-bottom: 2px solid #444; padding-bottom: .3em; }}
h2 {{ font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }}
h3 {{ font-size: 1em; }}
table {{ border-collapse: collapse; margin: .5em 0; font-size: .85em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }}
thead th {{ background: #f0f0f0; }}
table.kv th {{ background: #f7f7f7; font-weight: 600; }}
table.raters td, table.versions td {{ font-variant-numeric: tabular-nums; }}
figure {{ margin: 1em 0; }}
div.scroll {{ overflow-x: auto; max-width: 100%; }}
figure img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
figcaption {{ font-size: .85em; color: #444; max-width: 60em; }}
pre {{ background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .85em; white-space: pre-wrap; }}
code {{ background: #f3f3f3; padding: 0 .2em; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
