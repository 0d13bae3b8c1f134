"""Make the model cards' cross-check and calibration figures (issue 9).

    python models/make_figures.py                 # every model with a PyMC form
    python models/make_figures.py staple pstaple  # some of them
    python models/make_figures.py --no-crosscheck # calibration only
    python models/make_figures.py robust-t --no-calibration --reuse DIR
        # the cross-check outputs of `python -m bayesfuse.crosscheck_table --out DIR`

For each model this writes ``models/figures/<method>/``:

``crosscheck_*.png``, ``crosscheck_summary.csv``, ``crosscheck.txt``
    the output of ``bayesfuse check`` (solver against NUTS on a downsampled
    phantom: marginals, z-score and sd-ratio maps, the per-variable table and
    the verdict), run with the command recorded in ``crosscheck.txt``;
``calibration.png``, ``calibration.csv``
    coverage of the solver's central credible intervals against their
    nominal mass, on data drawn from the model's own ``simulate`` (all
    voxels and the contested ones), and a second panel that says what the
    intervals cannot: a reliability diagram of the label posterior (EM
    models) or the error against the posterior sd (Gaussian models).
    Computed with :mod:`bayesfuse.calibration` and :mod:`bayesfuse.summaries`.

and ``models/figures/README.md``: what was made, with which command, on
which machine and commit, and what could not be made and why (a model
without a PyMC form, without declared cross-check criteria or without a
``simulate``). The cards link the images. Timings in the verdicts are from
a shared, busy machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURES = HERE / "figures"
MASSES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class Setting:
    """How one model is cross-checked and calibrated for its card."""

    phantom: str = "probability"
    downsample: int = 4
    options: tuple[str, ...] = ()        # -o KEY=VALUE for the cross-check
    calibrate: bool = True
    cal_shape: tuple[int, ...] = (32, 32, 24)   # as the cards' `python -m bayesfuse.calibration ... --shape 32 32 24`
    cal_raters: int = 5
    cal_reps: int = 5
    cal_options: dict = field(default_factory=dict)


#: The STAPLE family and PSTAPLE: the command their cards document
#: (``bayesfuse check --method M --phantom outlier --downsample 8``).
SETTINGS: dict[str, Setting] = {
    "staple": Setting(phantom="outlier", downsample=8),
    "multi-staple": Setting(phantom="multiclass", calibrate=False),
    "soft-staple": Setting(phantom="outlier", downsample=8),
    "soft-staple-simplified": Setting(phantom="outlier", downsample=8),
    "pstaple": Setting(phantom="outlier", downsample=8),
    # the VB family and the mixture: the same command (issue 6's must-show), calibration on their simulate
    "robust-t": Setting(phantom="outlier", downsample=8),
    "gaussian": Setting(phantom="outlier", downsample=8),
    "continuous-staple": Setting(phantom="outlier", downsample=8),
    "mixture": Setting(phantom="outlier", downsample=8),
}


# ------------------------------------------------------------ cross-check
def crosscheck_command(method: str, s: Setting, out: Path) -> list[str]:
    cmd = ["bayesfuse", "check", "--method", method, "--phantom", s.phantom, "--downsample", str(s.downsample),
           "--seed", "0", "--out", str(out), "--force", "--quiet"]
    for o in s.options:
        cmd += ["-o", o]
    return cmd


def reuse(method: str, source: Path, folder: Path) -> str:
    """Keep the outputs of ``python -m bayesfuse.crosscheck_table --out SOURCE`` (the same
    check as ``bayesfuse check --phantom outlier --downsample 8 --seed 0``) instead of
    running NUTS again: figures, summary and the verdict stored in ``crosscheck.nc``."""
    import xarray as xr

    out = source / method
    if not (out / "summary.csv").is_file():
        raise RuntimeError(f"{out} holds no cross-check outputs (run python -m bayesfuse.crosscheck_table --out {source})")
    for f in out.glob("*.png"):
        shutil.copy(f, folder / f"crosscheck_{f.name}")
    shutil.copy(out / "summary.csv", folder / "crosscheck_summary.csv")
    tree = xr.open_datatree(out / "crosscheck.nc", engine="h5netcdf")
    text = str(tree.attrs["verdict"])
    (folder / "crosscheck.txt").write_text(
        f"$ python -m bayesfuse.crosscheck_table {method} --out OUT   (outputs kept by make_figures.py --reuse)\n"
        f"(passed {int(tree.attrs['passed'])})\n\n{text}\n")
    verdict = [line.strip() for line in text.splitlines() if "VERDICT" in line]
    return verdict[-1] if verdict else "no verdict"


def crosscheck(method: str, s: Setting, folder: Path) -> str:
    """Run ``bayesfuse check`` into a temporary folder and keep the figures and table."""
    exe = shutil.which("bayesfuse") or str(Path(sys.executable).with_name("bayesfuse"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "check"
        cmd = crosscheck_command(method, s, out)
        run = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, cwd=ROOT)
        text = (run.stdout + run.stderr).strip()
        if not out.is_dir() or not (out / "summary.csv").is_file():
            last = text.splitlines()[-1].replace(str(out), "OUT") if text else "no output"
            shown = " ".join("OUT" if c == str(out) else c for c in cmd)
            raise RuntimeError(f"`{shown}` exited {run.returncode}: {last}")
        for f in out.glob("*.png"):
            shutil.copy(f, folder / f"crosscheck_{f.name}")
        shutil.copy(out / "summary.csv", folder / "crosscheck_summary.csv")
    shown = " ".join(c if c != str(out) else "OUT" for c in cmd)
    (folder / "crosscheck.txt").write_text(f"$ {shown}\n(exit {run.returncode})\n\n{text}\n")
    verdict = [line.strip() for line in text.splitlines() if "VERDICT" in line]
    return verdict[-1] if verdict else f"exit {run.returncode}"


# ------------------------------------------------------------ calibration
def calibration(method: str, s: Setting, folder: Path) -> str:
    """Coverage against nominal mass, and a reliability or error-vs-sd panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from bayesfuse import calibration as cal
    from bayesfuse import summaries
    from bayesfuse.models import get_model

    config = get_model(method).config(**s.cal_options)
    rows, probs, outcomes, errors, sds = [], [], [], [], []
    kind = None
    for rep in range(s.cal_reps):
        seed = rep
        data, truth = cal.simulate(method, config, s.cal_shape, s.cal_raters, seed)
        result, fitted_on = cal.fit_simulated(method, data, truth, config, seed)
        kind = summaries.posterior_kind(result)
        target = cal.true_quantity(truth, data.n_classes, kind)
        contested = cal.contested_voxels(data)
        for mass in MASSES:
            sm = summaries.summarize(result, mass, random_seed=seed)
            lo, hi = sm["consensus_lo"].values, sm["consensus_hi"].values
            rows.append({"rep": rep, "mass": mass, "coverage": cal.coverage(lo, hi, target),
                         "coverage_contested": cal.coverage(lo, hi, target, contested),
                         "contested": int(contested.sum()), "voxels": int(contested.size), "fitted_on": fitted_on})
        if kind == "categorical":
            probs.append(result.probability.values[..., 1][contested])
            outcomes.append(target[contested])
        else:
            sm = summaries.summarize(result, 0.9, random_seed=seed)
            mean = sm["consensus_mean"].values if "consensus_mean" in sm else result.probability.values[..., 1]
            errors.append(np.abs(target - mean)[contested])
            sds.append(sm["consensus_sd"].values[contested])
    table = pd.DataFrame(rows)
    table.to_csv(folder / "calibration.csv", index=False)
    agg = table.groupby("mass")[["coverage", "coverage_contested"]].mean()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(MASSES, MASSES, "k:", lw=1, label="nominal")
    axes[0].plot(agg.index, agg["coverage"], "o-", label="all voxels")
    axes[0].plot(agg.index, agg["coverage_contested"], "s-", label="contested voxels")
    axes[0].set(xlabel="nominal mass of the central interval", ylabel="coverage of the truth",
                title=f"{method}: coverage ({s.cal_reps} simulations, {'x'.join(map(str, s.cal_shape))})")
    axes[0].legend()
    if kind == "categorical":
        p, y = np.concatenate(probs), np.concatenate(outcomes)
        bins = np.minimum((p * 10).astype(int), 9)
        n = np.bincount(bins, minlength=10)
        used = n > 0
        mean_p = np.bincount(bins, p, 10)[used] / n[used]
        freq = np.bincount(bins, y, 10)[used] / n[used]
        axes[1].plot([0, 1], [0, 1], "k:", lw=1)
        axes[1].plot(mean_p, freq, "o-")
        for x, f, k in zip(mean_p, freq, n[used]):
            axes[1].annotate(str(k), (x, f), textcoords="offset points", xytext=(3, -10), fontsize=7)
        axes[1].set(xlabel="label posterior w (binned)", ylabel="observed frequency of the label",
                    title=f"reliability, contested voxels (ECE {cal.calibration_error(p, y):.3f})")
    else:
        e, sd = np.concatenate(errors), np.concatenate(sds)
        edges = np.quantile(sd, np.linspace(0, 1, 11))
        idx = np.clip(np.searchsorted(edges, sd, side="right") - 1, 0, 9)
        mid = np.array([sd[idx == b].mean() for b in range(10)])
        err = np.array([np.sqrt(np.mean(e[idx == b] ** 2)) for b in range(10)])
        top = max(mid.max(), err.max()) * 1.1
        axes[1].plot([0, top], [0, top], "k:", lw=1, label="calibrated: RMS error = sd")
        axes[1].plot(mid, err, "o-", label="deciles of the posterior sd")
        axes[1].set(xlabel="posterior sd of the consensus probability", ylabel="RMS error against the truth",
                    title="error against predicted sd, contested voxels")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(folder / "calibration.png", dpi=90)
    plt.close(fig)
    c90 = agg.loc[0.9]
    return f"coverage of the 90% intervals: {c90['coverage']:.3f} (all), {c90['coverage_contested']:.3f} (contested)"


# ------------------------------------------------------------------- main
def _provenance() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "bayesfuse"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    from bayesfuse import __version__

    return (f"bayesfuse {__version__}, commit {commit or '?'}{' (with uncommitted changes under bayesfuse/)' if dirty else ''}; "
            f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")


def main(argv=None) -> int:
    from bayesfuse.models import REGISTRY

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("methods", nargs="*", help="registry names (default: every model with a PyMC form)")
    p.add_argument("--no-crosscheck", action="store_true")
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--reuse", type=Path, metavar="DIR",
                   help="take the cross-checks from `python -m bayesfuse.crosscheck_table --out DIR` instead of rerunning NUTS")
    args = p.parse_args(argv)
    methods = args.methods or [n for n, spec in sorted(REGISTRY.items()) if spec.pymc]
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        p.error(f"unknown method(s) {unknown}; see `bayesfuse models`")
    status_file = FIGURES / "status.tsv"
    status, when = {}, {}
    if status_file.is_file():
        for line in status_file.read_text().splitlines():
            parts = line.split("\t")
            method, what, text = parts[0], parts[1], parts[-1]
            status[(method, what)] = text
            when[(method, what)] = parts[2] if len(parts) == 4 else "?"
    today = f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M}"
    for method in methods:
        s = SETTINGS.get(method, Setting())
        folder = FIGURES / method
        folder.mkdir(parents=True, exist_ok=True)
        check_fn = crosscheck if args.reuse is None else (lambda m, _s, f: reuse(m, args.reuse, f))
        jobs = [("cross-check", check_fn)] * (not args.no_crosscheck) + [("calibration", calibration)] * (not args.no_calibration)
        for what, fn in jobs:
            if what == "calibration" and not s.calibrate:
                status[(method, what)] = "not made: its simulate() draws binary STAPLE only (no K-class simulation)"
                continue
            try:
                status[(method, what)] = fn(method, s, folder)
            except Exception as exc:  # recorded in the README, the run goes on with the next model
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                prefix = "crosscheck_" if what == "cross-check" else "calibration"
                if any(folder.glob(f"{prefix}*.png")) and (method, what) in status and not status[(method, what)].startswith("not made"):
                    earlier = status[(method, what)].split(" [kept from an earlier run")[0]
                    status[(method, what)] = f"{earlier} [kept from an earlier run; the last rerun failed: {why}]"
                else:
                    status[(method, what)] = f"not made: {why}"
            when[(method, what)] = today
            print(f"{method} {what}: {status[(method, what)]}", flush=True)
    status_file.write_text("".join(f"{m}\t{w}\t{when[(m, w)]}\t{t}\n" for (m, w), t in sorted(status.items())))
    lines = ["# Figures of the model cards", "",
             "Made by `python models/make_figures.py` (see its docstring); do not edit by hand.", "",
             f"Last run ({', '.join(methods)}): {_provenance()}. Timings printed in the verdicts come from a "
             "shared, busy machine.", "",
             "| method | what | made | result |", "|---|---|---|---|"]
    lines += [f"| `{m}` | {w} | {when[(m, w)]} | {t} |" for (m, w), t in sorted(status.items())]
    (FIGURES / "README.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
