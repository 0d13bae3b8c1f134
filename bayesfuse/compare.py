"""Method comparison study: run several fusion methods on every case of a
dataset, score each consensus against a reference, and test the differences.

This is the study of seed 000's Fig. 4 (section 4.2) made reusable: Dice and
Hausdorff distances of each method's consensus against a reference, their
distributions as box plots, and Wilcoxon signed-rank tests of every method
against a chosen one, flagged at p < 0.05 as the paper does (with Holm's
correction for the number of methods reported beside it).

Entry points: :func:`compare` (a manifest or study folder, as ``bayesfuse
batch`` reads it; the ``bayesfuse compare`` command) and
:func:`compare_cases` (cases already in memory, e.g. from
:mod:`bayesfuse.datasets`, as ``benchmarks/study.py`` uses it). Both write,
into ``DIR``:

``scores.csv``
    one row per (case, held-out rater, method): ``dice``, ``hd95``,
    ``hausdorff`` (mm; ``inf`` when exactly one of consensus and reference
    is empty), ``soft_dice`` (the consensus probability against the
    reference), ``seconds``, ``iterations``, ``converged`` and ``error``.
``summary.csv``
    per method and metric: number of cases, median, quartiles, mean.
``wilcoxon.csv``
    per metric and method: the paired test against ``against`` (see
    :func:`wilcoxon_table`).
``boxplots.png``
    one panel per metric, one box per method, ``*`` on the methods that
    differ significantly from ``against``.
``study.json``
    the settings, the methods, the cases, the cases left out and why.

References
----------
The reference a consensus is scored against (``reference``):

``"majority-vote"``
    the majority vote of all the case's raters, ties to foreground (the
    reference seed 000 uses for LIDC). Methods fitted to the same raters are
    then scored against a function of their own input: majority vote scores
    perfectly against itself, by construction.
``"manifest"``
    the manifest's ``reference`` column (``reference.nii.gz`` in a folder).
a file pattern
    containing ``{subject}``, relative to the manifest's folder, e.g.
    ``gt/{subject}.nii.gz``.
leave-one-rater-out (``leave_one_rater_out=True``)
    each rater in turn is the reference and the others are fused: a
    reference no method was fitted to. Cases with fewer than three raters
    are left out (one rater cannot be fused). The tests then pair methods
    over cases, on each case's mean over its held-out raters, since the
    held-out raters of one case are not independent.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .data import RaterMaps
from .errors import ConfigError, InputError
from .io import check_outputs, write_staged

#: Metrics in ``scores.csv``, and whether larger is better.
METRICS = {"dice": True, "hd95": False, "hausdorff": False, "soft_dice": True}
#: The files a study writes into its folder.
OUTPUTS = ("scores.csv", "summary.csv", "wilcoxon.csv", "boxplots.png", "study.json")
#: ``zero_method`` values of :func:`scipy.stats.wilcoxon`.
ZERO_METHODS = ("wilcox", "pratt", "zsplit")
#: Below this many cases the study runs in this process rather than on Dask.
DASK_MIN_CASES = 8
#: Option keys of a method spec that are not Config fields: the conversion.
CONVERSION_KEY, CONVERSION_PREFIX = "to_prob", "prob_"


# ------------------------------------------------------------------ methods
@dataclass(frozen=True)
class MethodRun:
    """One method of a study, as named on the command line.

    ``gaussian:spatial_prior=false`` is the zoo's ``gaussian`` with the
    option ``spatial_prior=False``; options are separated by ``:``. The keys
    ``to_prob`` and ``prob_<option>`` choose this method's conversion of
    binary masks to probabilities instead of the study's default.

    Attributes
    ----------
    label : str
        The spec as given (the method's name in tables and plots).
    name : str
        Registry name.
    options : dict
        Config fields.
    to_prob : str or None
        Conversion for this method (None: the study's default).
    prob_options : dict
        Options of that conversion.
    """

    label: str
    name: str
    options: dict = field(default_factory=dict)
    to_prob: str | None = None
    prob_options: dict = field(default_factory=dict)

    def spec(self):
        from .models import get_model

        return get_model(self.name)

    def config(self):
        return self.spec().config(**self.options)


def parse_method(text: str) -> MethodRun:
    """Read ``name[:key=value[:key=value...]]`` and check it against the zoo.

    Raises
    ------
    ConfigError
        Unknown method or option, or a malformed ``key=value``.
    """
    from .commands.common import parse_value

    label = text.strip()
    if not label:
        raise ConfigError("empty method name in --methods")
    name, *pairs = label.split(":")
    options: dict[str, Any] = {}
    to_prob, prob_options = None, {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"method {label!r}: option {pair!r} is not KEY=VALUE (options are separated by ':')")
        k, v = (s.strip() for s in pair.split("=", 1))
        k = k.replace("-", "_")
        if k == CONVERSION_KEY:
            to_prob = str(parse_value(v))
        elif k.startswith(CONVERSION_PREFIX):
            prob_options[k[len(CONVERSION_PREFIX):]] = parse_value(v)
        else:
            options[k] = parse_value(v)
    run = MethodRun(label=label, name=name.strip(), options=options, to_prob=to_prob, prob_options=prob_options)
    run.config()  # unknown method or option: fail now, before any work
    if to_prob is not None:
        from .api import TO_PROB

        if to_prob not in TO_PROB:
            raise ConfigError(f"method {label!r}: unknown conversion {to_prob!r}; choose one of {', '.join(TO_PROB)}")
    return run


def parse_methods(methods: str | Sequence[str]) -> list[MethodRun]:
    """A comma-separated list (or a sequence) of method specs, without repeats."""
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    runs = [m if isinstance(m, MethodRun) else parse_method(m) for m in items if str(m).strip()]
    if not runs:
        raise ConfigError("no method given (--methods m1,m2,...)")
    labels = [r.label for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"method(s) listed twice: {', '.join(dup)}")
    return runs


# ------------------------------------------------------------------ scoring
def score(probability: np.ndarray, reference: np.ndarray, spacing=None, roi=None) -> dict[str, float]:
    """Dice, HD95, Hausdorff (mm) and soft Dice of a consensus against a reference.

    Parameters
    ----------
    probability : ndarray (*spatial, K)
        The consensus on the simplex; its labels are the argmax.
    reference : ndarray (*spatial)
        Reference labels 0..K-1.
    spacing : sequence of float, optional
        Voxel size (mm).
    roi : ndarray of bool, optional
        Region of interest (outside it both count as background).

    Returns
    -------
    dict
        For K > 2 classes, each metric is the mean over the foreground classes
        1..K-1 (a class absent from both maps scores Dice 1, distance 0).
    """
    from . import metrics

    prob = np.asarray(probability)
    k = prob.shape[-1]
    ref = np.asarray(reference)
    if ref.shape != prob.shape[:-1]:
        raise InputError("reference", f"shape {ref.shape} differs from the consensus's {prob.shape[:-1]}")
    if ref.size and (ref.min() < 0 or ref.max() >= max(k, 2)):
        raise InputError("reference", f"labels outside 0..{k - 1}")
    labels = np.argmax(prob, axis=-1)
    out = {m: 0.0 for m in METRICS}
    for c in range(1, k):
        a, b = labels == c, ref == c
        out["dice"] += metrics.dice(a, b, roi=roi)
        out["hd95"] += metrics.hd95(a, b, spacing, roi=roi)
        out["hausdorff"] += metrics.hausdorff(a, b, spacing, roi=roi)
        out["soft_dice"] += metrics.soft_dice(b.astype(np.float64), np.clip(prob[..., c], 0, 1), roi=roi)
    return {m: v / (k - 1) for m, v in out.items()}


def diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The image's diagonal in mm: the largest distance two of its voxels can have."""
    return float(np.sqrt(np.sum((np.asarray(shape) * np.asarray(spacing, dtype=float)) ** 2)))


# -------------------------------------------------------------- one case
@dataclass(frozen=True)
class Settings:
    """What every case of a study shares (picklable, sent to Dask workers)."""

    methods: tuple[MethodRun, ...]
    reference: str = "majority-vote"
    leave_one_rater_out: bool = False
    to_prob: str = "none"
    to_prob_options: dict = field(default_factory=dict)
    max_iter: int | None = None
    tol: float | None = None
    random_seed: int | None = None
    kind: str | None = None
    n_classes: int | None = None
    invert: bool = False
    spacing: tuple[float, ...] | None = None

    def record(self) -> dict:
        d = asdict(self)
        d["methods"] = [asdict(m) for m in self.methods]
        return json.loads(json.dumps(d, default=str))


def majority_reference(data: RaterMaps) -> np.ndarray:
    """Majority vote of the raters' labels, ties to the highest class (foreground)."""
    from .models.baselines import majority_vote

    return np.argmax(majority_vote(data.labels(), data.n_classes, "highest"), axis=-1)


def _convert(data: RaterMaps, run: MethodRun, settings: Settings, cache: dict) -> RaterMaps:
    """The input this method fuses: masks as given to methods of hard labels,
    else the study's (or the method's own) conversion, computed once per case."""
    from . import api

    to_prob = run.to_prob
    options = run.prob_options if run.to_prob is not None else settings.to_prob_options
    if to_prob is None:
        to_prob = "none" if run.spec().input in ("binary", "labels") else settings.to_prob
    if to_prob == "none" or data.kind == "probability":
        return data
    key = (to_prob, json.dumps(options, sort_keys=True, default=str))
    if key not in cache:
        cache[key] = api.convert(data, to_prob, **options)
    return cache[key]


def _fit_and_score(data: RaterMaps, reference: np.ndarray, run: MethodRun, settings: Settings, cache: dict) -> dict:
    t0 = time.perf_counter()
    row: dict[str, Any] = {m: math.nan for m in METRICS}
    row.update(seconds=math.nan, iterations=pd.NA, converged=pd.NA, error="")
    try:
        spec = run.spec()
        x = _convert(data, run, settings, cache)
        kwargs: dict[str, Any] = {"random_seed": settings.random_seed, "progress": False, "method": run.name}
        if settings.max_iter is not None:
            kwargs["max_iter"] = settings.max_iter
        if settings.tol is not None:
            kwargs["tol"] = settings.tol
        result = spec.load().fit(x, run.config(), **kwargs)
        prob = result.probability.transpose(*result.spatial_dims, "class").values
        row.update(score(prob, reference, data.spacing, data.roi()))
        row.update(seconds=round(time.perf_counter() - t0, 4), iterations=result.n_iter or pd.NA,
                   converged=pd.NA if result.converged is None else bool(result.converged))
    except Exception as exc:  # one failing method must not stop the study
        from .batch import one_line

        row.update(seconds=round(time.perf_counter() - t0, 4), error=one_line(exc))
    return row


def run_case(case_id: str, source, settings: Settings) -> tuple[list[dict], str]:
    """Every method on one case (every held-out rater in leave-one-out mode).

    Parameters
    ----------
    case_id : str
    source : RaterMaps, (RaterMaps, reference) or manifest Subject
        The case's raters; a reference array may come with them.
    settings : Settings

    Returns
    -------
    rows : list of dict
        One row of ``scores.csv`` per (held-out rater, method).
    note : str
        Why the case was left out ("" if it was not).
    """
    from .manifest import Subject

    try:
        given_ref = None
        if isinstance(source, Subject):
            data = source.load(kind=settings.kind, n_classes=settings.n_classes, invert=settings.invert, spacing=settings.spacing)
            if not settings.leave_one_rater_out and settings.reference != "majority-vote":
                given_ref = source.load_reference(data.shape, invert=settings.invert)
        elif isinstance(source, tuple):
            data, given_ref = source
        else:
            data = source
    except (InputError, ConfigError) as exc:
        return [], f"cannot be read: {exc}"
    diag = diagonal_mm(data.shape, data.spacing)
    units: list[tuple[str, RaterMaps, np.ndarray]] = []
    if settings.leave_one_rater_out:
        if data.n_raters < 3:
            return [], f"{data.n_raters} raters: leave-one-rater-out needs at least 3"
        labels = data.labels()
        for i, name in enumerate(data.rater_names):
            rest = [j for j in range(data.n_raters) if j != i]
            units.append((name, data.subset(rest), labels[i]))
    else:
        if settings.reference == "majority-vote":
            ref = majority_reference(data)
        elif given_ref is None:
            return [], "no reference"
        else:
            ref = np.asarray(given_ref)
        units.append(("", data, ref))
    rows = []
    for held_out, d, ref in units:
        cache: dict = {}
        for run in settings.methods:
            row = {"case": case_id, "held_out": held_out, "method": run.label, "n_raters": d.n_raters,
                   "diagonal_mm": round(diag, 4)}
            row.update(_fit_and_score(d, ref, run, settings, cache))
            rows.append(row)
    return rows, ""


# --------------------------------------------------------------- statistics
def case_scores(scores: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One value per (case, method): the mean over held-out raters, with
    infinite distances capped at the image's diagonal.

    A distance is infinite when exactly one of consensus and reference is
    empty; the diagonal is the largest distance two voxels of the image can
    have, the worst any non-empty answer could score, so ranks stay
    meaningful.

    Returns
    -------
    DataFrame
        Index: case; columns: methods. Rows that failed (NaN) stay NaN.
    """
    v = scores[metric].astype(float)
    if not METRICS[metric]:
        v = v.where(~np.isinf(v), scores["diagonal_mm"].astype(float))
    df = scores.assign(_v=v)
    return df.groupby(["case", "method"], sort=False)["_v"].mean().unstack("method")


def wilcoxon_pair(x: np.ndarray, y: np.ndarray, zero_method: str = "wilcox") -> tuple[float, float]:
    """Wilcoxon signed-rank test of paired samples (two-sided), robust to
    all-zero differences.

    ``scipy.stats.wilcoxon(x, y, zero_method=zero_method)`` with its default
    ``method="auto"`` (exact null distribution for small samples without
    ties or zeros, the normal approximation otherwise). When every difference
    is zero there is nothing to rank: the result is (0.0, 1.0) instead of
    scipy's NaN.
    """
    from scipy.stats import wilcoxon

    d = np.asarray(x, float) - np.asarray(y, float)
    if d.size == 0:
        return math.nan, math.nan
    if not np.any(d != 0):
        return 0.0, 1.0
    res = wilcoxon(x, y, zero_method=zero_method)
    return float(res.statistic), float(res.pvalue)


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of p-values (NaN stays NaN)."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


def wilcoxon_table(scores: pd.DataFrame, against: str, *, metrics: Iterable[str] = tuple(METRICS),
                   alpha: float = 0.05, zero_method: str = "wilcox") -> pd.DataFrame:
    """Wilcoxon signed-rank tests of every method against ``against``.

    Pairs are cases where both methods have a score (see
    :func:`case_scores`). Columns: ``metric``, ``method``, ``against``,
    ``n`` (pairs), ``n_nonzero`` (pairs that differ), ``median``,
    ``median_against``, ``median_difference`` (of method minus against),
    ``statistic``, ``p_value``, ``p_holm`` (Holm over the methods of one
    metric), ``direction`` (``better``, ``worse`` or ``equal`` for the method,
    by the metric's sense and the median difference; by the mean difference
    when the median is 0), ``significant`` (p < alpha, the paper's flag) and
    ``significant_holm``.
    """
    if zero_method not in ZERO_METHODS:
        raise ConfigError(f"zero_method must be one of {', '.join(ZERO_METHODS)}, not {zero_method!r}")
    if against not in set(scores["method"]):
        raise ConfigError(f"--against {against!r} is not one of the study's methods: {', '.join(dict.fromkeys(scores['method']))}")
    rows = []
    for metric in metrics:
        table = case_scores(scores, metric)
        block = []
        for method in table.columns:
            if method == against:
                continue
            pair = table[[method, against]].dropna()
            x, y = pair[method].to_numpy(), pair[against].to_numpy()
            stat, p = wilcoxon_pair(x, y, zero_method)
            d = x - y
            med = float(np.median(d)) if d.size else math.nan
            centre = med if med != 0 else (float(np.mean(d)) if d.size else math.nan)
            if not d.size or centre == 0 or not np.isfinite(centre):
                direction = "equal"
            else:
                direction = "better" if (centre > 0) == METRICS[metric] else "worse"
            block.append({
                "metric": metric, "method": method, "against": against, "n": int(d.size),
                "n_nonzero": int(np.count_nonzero(d)),
                "median": float(np.median(x)) if d.size else math.nan,
                "median_against": float(np.median(y)) if d.size else math.nan,
                "median_difference": med, "statistic": stat, "p_value": p, "direction": direction,
            })
        adj = holm([r["p_value"] for r in block])
        for r, ph in zip(block, adj):
            r["p_holm"] = ph
            r["significant"] = bool(np.isfinite(r["p_value"]) and r["p_value"] < alpha)
            r["significant_holm"] = bool(np.isfinite(ph) and ph < alpha)
        rows += block
    cols = ["metric", "method", "against", "n", "n_nonzero", "median", "median_against", "median_difference",
            "statistic", "p_value", "p_holm", "direction", "significant", "significant_holm"]
    return pd.DataFrame(rows, columns=cols)


def summary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Per method and metric: cases scored, failures, median, quartiles, mean."""
    rows = []
    for metric in METRICS:
        table = case_scores(scores, metric)
        for method in table.columns:
            v = table[method].dropna().to_numpy()
            q = np.percentile(v, [25, 50, 75]) if v.size else [math.nan] * 3
            rows.append({"metric": metric, "method": method, "n": int(v.size),
                         "failed": int((scores.loc[scores["method"] == method, "error"].astype(str) != "").sum()),
                         "q1": q[0], "median": q[1], "q3": q[2], "mean": float(v.mean()) if v.size else math.nan})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ plots
def significance_marks(tests: pd.DataFrame, metric: str) -> dict[str, str]:
    """The box plot's mark of each method significantly different on one metric.

    ``*`` (p < alpha) or ``**`` (also after Holm), then ``+`` (better) or
    ``-`` (worse); methods that do not differ are absent.
    """
    rows = tests[(tests["metric"] == metric) & tests["significant"].astype(bool)]
    return {r.method: ("**" if r.significant_holm else "*") + {"better": "+", "worse": "-"}.get(r.direction, "")
            for r in rows.itertuples()}


def plot_boxes(scores: pd.DataFrame, tests: pd.DataFrame, path: str | os.PathLike, *, title: str = "") -> Path:
    """Box plots of each metric's distribution per method (seed 000, Fig. 4).

    Methods are ordered by median Dice, best at the top; the ``against``
    method's name is drawn in bold. In each metric's panel, a ``*`` at the
    right of a method's row marks a significant difference from ``against``
    on that metric (p < alpha, uncorrected, as in the paper), ``**`` one that
    stays significant after Holm's correction; ``+`` / ``-`` after it says
    whether the method is better or worse. The marks are per panel because
    the panels share their method labels. Infinite distances are drawn at the
    image diagonal (see :func:`case_scores`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    metrics = [m for m in METRICS if m in scores]
    dice = case_scores(scores, "dice")
    order = dice.median().sort_values(ascending=True).index.tolist()  # best last = drawn on top
    against = tests["against"].iloc[0] if len(tests) else None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 0.42 * len(order) + 1.6), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics):
        table = case_scores(scores, metric)
        data = [table[m].dropna().to_numpy() if m in table else np.array([]) for m in order]
        ax.boxplot(data, orientation="horizontal", widths=0.6, showfliers=True, flierprops={"markersize": 2})
        # sharey: one set of tick labels serves every panel, so a panel's
        # significance marks go inside the panel, not into the labels.
        ax.set_yticks(range(1, len(order) + 1), order)
        for tick, m in zip(ax.get_yticklabels(), order):
            if m == against:
                tick.set_fontweight("bold")
        at_right = blended_transform_factory(ax.transAxes, ax.transData)
        for m, mark in significance_marks(tests, metric).items():
            if m in order:
                ax.text(1.01, order.index(m) + 1, mark, transform=at_right, ha="left", va="center",
                        fontsize=9, color="tab:red", clip_on=False)
        unit = "" if METRICS[metric] else " (mm)"
        ax.set_xlabel(f"{metric}{unit}, {'higher' if METRICS[metric] else 'lower'} is better")
        ax.grid(axis="x", alpha=0.3)
    if title or against:
        fig.suptitle((title + "; " if title else "") + (f"Wilcoxon signed-rank vs {against} (bold): * p < alpha, ** also after Holm; + better, - worse" if against else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------- run
def _execute(items: list[tuple[str, Any]], settings: Settings, *, workers: int | None, scheduler: str | None,
             client, progress: bool | None) -> list[tuple[list[dict], str]]:
    """Run every case, in this process or on Dask (many cases, or a cluster given)."""
    from . import progress as _progress

    use_dask = client is not None or scheduler is not None or (
        (workers is None or workers > 1) and len(items) >= DASK_MIN_CASES and _cores() > 1)
    if workers == 0:
        use_dask = False
    results: dict[str, tuple[list[dict], str]] = {}
    with _progress.bar("compare", total=len(items), progress=progress) as bar:
        if not use_dask:
            for cid, src in items:
                results[cid] = run_case(cid, src, settings)
                bar.advance(info=cid)
        else:
            from dask.distributed import as_completed

            from .batch import open_client

            n = min(workers or _cores(), len(items))
            with open_client(client, scheduler, n) as c:
                futures = {c.submit(run_case, cid, src, settings, pure=False): cid for cid, src in items}
                try:
                    for fut in as_completed(futures):
                        cid = futures[fut]
                        try:
                            results[cid] = fut.result()
                        except Exception as exc:  # a worker died
                            results[cid] = ([], f"the worker running it died or was lost ({exc})")
                        bar.advance(info=cid)
                except BaseException:
                    c.cancel(list(futures))
                    raise
    return [results[cid] for cid, _ in items]


def _cores() -> int:
    from .batch import default_workers

    return default_workers()


def compare_cases(
    cases: Iterable[tuple[str, Any]],
    methods: str | Sequence[str | MethodRun],
    out_dir: str | os.PathLike,
    *,
    reference: str = "majority-vote",
    leave_one_rater_out: bool = False,
    against: str | None = None,
    alpha: float = 0.05,
    zero_method: str = "wilcox",
    to_prob: str = "none",
    to_prob_options: dict | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    random_seed: int | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    client=None,
    title: str = "",
    force: bool = False,
    progress: bool | None = None,
    _settings_extra: dict | None = None,
) -> dict[str, pd.DataFrame]:
    """Run a comparison study on cases and write its outputs into ``out_dir``.

    Parameters
    ----------
    cases : iterable of (id, source)
        ``source``: a :class:`~bayesfuse.data.RaterMaps`, a tuple
        ``(RaterMaps, reference labels)``, or a manifest ``Subject``.
    methods : str or sequence
        Method specs (:func:`parse_method`), e.g. ``"staple,gaussian:spatial_prior=false"``.
    reference : {"majority-vote", "manifest"} or str
        See the module docstring; with tuples, anything but
        ``"majority-vote"`` uses the given arrays.
    leave_one_rater_out : bool
        Each rater in turn is the reference, the others are fused.
    against : str, optional
        The method every other is tested against (default: the first).
    alpha : float
        Significance level of the flags.
    zero_method : {"wilcox", "pratt", "zsplit"}
        How :func:`scipy.stats.wilcoxon` treats zero differences (default
        ``"wilcox"``: they are dropped, the classic test).
    to_prob, to_prob_options
        Default conversion of binary masks for every method that fuses
        probabilities (methods of hard labels get the masks).
    max_iter, tol, random_seed
        Solver settings shared by all methods.
    workers, scheduler, client
        Dask: by default the study runs on a local cluster (one worker per
        core) when it has at least :data:`DASK_MIN_CASES` cases; ``workers=0``
        runs in this process.
    force : bool
        Overwrite an earlier study's outputs.

    Returns
    -------
    dict of DataFrame
        ``scores``, ``summary``, ``wilcoxon``.
    """
    runs = tuple(parse_methods(methods))
    against = against or runs[0].label
    if against not in [r.label for r in runs]:
        raise ConfigError(f"--against {against!r} is not one of the study's methods: {', '.join(r.label for r in runs)}")
    if zero_method not in ZERO_METHODS:
        raise ConfigError(f"zero_method must be one of {', '.join(ZERO_METHODS)}, not {zero_method!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must lie in (0, 1), not {alpha!r}")
    from .api import TO_PROB

    if to_prob not in TO_PROB:
        raise ConfigError(f"unknown conversion {to_prob!r}; choose one of {', '.join(TO_PROB)}")
    out = Path(out_dir)
    check_outputs(out, OUTPUTS, force)
    settings = Settings(methods=runs, reference=reference, leave_one_rater_out=leave_one_rater_out, to_prob=to_prob,
                        to_prob_options=dict(to_prob_options or {}), max_iter=max_iter, tol=tol,
                        random_seed=random_seed, **(_settings_extra or {}))
    items = list(cases)
    if not items:
        raise InputError("dataset", "no case to compare")
    ids = [cid for cid, _ in items]
    if len(set(ids)) != len(ids):
        raise InputError("dataset", "case ids repeat")
    t0 = time.perf_counter()
    outcomes = _execute(items, settings, workers=workers, scheduler=scheduler, client=client, progress=progress)
    rows = [r for case_rows, _ in outcomes for r in case_rows]
    left_out = {cid: note for (cid, _), (_, note) in zip(items, outcomes) if note}
    if not rows:
        raise InputError("dataset", f"no case could be scored ({len(left_out)} left out: {next(iter(left_out.values()), '')})")
    scores = pd.DataFrame(rows)
    tests = wilcoxon_table(scores, against, alpha=alpha, zero_method=zero_method)
    summary = summary_table(scores)
    study = {
        "settings": settings.record(), "against": against, "alpha": alpha, "zero_method": zero_method,
        "cases": ids, "left_out": left_out, "n_scored_cases": int(scores["case"].nunique()),
        "seconds": round(time.perf_counter() - t0, 2), "title": title,
        "pairing": "per case (mean over held-out raters)" if leave_one_rater_out else "per case",
        "infinite_distances": "capped at the image diagonal in the tests, summaries and plots; inf in scores.csv",
    }
    _write(out, scores, summary, tests, study, title, force)
    return {"scores": scores, "summary": summary, "wilcoxon": tests}


def compare(
    dataset: str | os.PathLike,
    methods: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    reference: str = "majority-vote",
    kind: str | None = None,
    n_classes: int | None = None,
    invert: bool = False,
    spacing: Sequence[float] | None = None,
    **options,
) -> dict[str, pd.DataFrame]:
    """Run a comparison study on a manifest (CSV) or study folder.

    ``reference``: ``"majority-vote"``, ``"manifest"`` (the manifest's
    reference files), or a pattern with ``{subject}`` relative to the
    manifest's folder. Other options as in :func:`compare_cases`.

    Raises
    ------
    InputError
        Before any work: a bad manifest, or a reference file that is missing.
    """
    from dataclasses import replace

    from .manifest import Manifest, read_manifest

    study = dataset if isinstance(dataset, Manifest) else read_manifest(dataset)
    subjects = list(study)
    if not options.get("leave_one_rater_out") and reference != "majority-vote":
        base = study.source if study.source.is_dir() else study.source.parent
        resolved = []
        for s in subjects:
            if reference == "manifest":
                path = s.reference
                if path is None:
                    raise InputError(s.id, "has no reference in the manifest (a 'reference' column, or reference.nii.gz in its folder); use --reference majority-vote or a FILE-PATTERN")
            else:
                if "{subject}" not in reference:
                    raise ConfigError(f"--reference {reference!r}: expected majority-vote, manifest, or a file pattern containing {{subject}}")
                path = Path(reference.format(subject=s.id)).expanduser()
                path = path if path.is_absolute() else base / path
            if not Path(path).is_file():
                raise InputError(str(path), f"reference of subject {s.id}: no such file")
            resolved.append(replace(s, reference=Path(path)))
        subjects = resolved
    extra = {"kind": kind, "n_classes": n_classes, "invert": invert, "spacing": tuple(spacing) if spacing else None}
    return compare_cases([(s.id, s) for s in subjects], methods, out_dir, reference=reference, _settings_extra=extra, **options)


# ------------------------------------------------------------------ output
def _write(out: Path, scores, summary, tests, study, title, force) -> None:
    """All outputs into a staging folder, then moved into place together."""
    def fill(stage: Path) -> None:
        scores.to_csv(stage / "scores.csv", index=False, float_format="%.6g")
        summary.to_csv(stage / "summary.csv", index=False, float_format="%.6g")
        tests.to_csv(stage / "wilcoxon.csv", index=False, float_format="%.6g")
        plot_boxes(scores, tests, stage / "boxplots.png", title=title)
        (stage / "study.json").write_text(json.dumps(study, indent=1, default=str))

    write_staged(out, OUTPUTS, force, fill, prefix=".bayesfuse-compare-")
