"""The cross-check table of ``models/README.md``: every model against NUTS.

Run ``python -m bayesfuse.crosscheck_table --readme models/README.md`` to
cross-check every model that has a PyMC form and declared criteria on the
same small problem (the outlier phantom downsampled 8 times, as
``bayesfuse check --phantom outlier --downsample 8``), print the Markdown
table, and write it into the README between its two marker lines. With
``--out DIR`` each model's full outputs (summary.csv, crosscheck.nc,
figures) go to ``DIR/<model>/``.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

#: Marker lines in the README around the generated table.
START = "<!-- crosscheck-table: start (python -m bayesfuse.crosscheck_table --readme models/README.md) -->"
END = "<!-- crosscheck-table: end -->"

HEAD = ("model", "NUTS health", "voxels within 0.5 sd", "median sd ratio (voxels; parameters)", "k-hat",
        "solver time", "NUTS time (compile)", "NUTS / solver", "verdict")


def _fmt(x: float, spec: str = ".3g") -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, spec)


def row(cc) -> dict:
    """One table row from a :class:`bayesfuse.crosscheck.CrossCheck`."""
    s = cc.summary.set_index("variable")
    sdims = set(cc.result.spatial_dims)
    voxel = next((n for n, st in cc.stats.items() if sdims <= set(st["zscore"].dims)), None)
    # label probabilities (the mixture's responsibilities) have Bernoulli sds, not a parameter's
    labels = {r.variable for r in cc.criteria.rules if getattr(r, "labels", False)}
    params = [n for n in cc.stats if n != voxel and n not in labels]
    within = "-"
    vox_ratio = float("nan")
    if voxel is not None:
        r = s.loc[voxel]
        within = f"{r['share_within']:.1%} of {int(r['compared'])} {r['where']}"
        vox_ratio = r["sd_ratio_median"]
    # parameters whose q has spread (a point estimate has no sd to compare)
    par_ratio = [s.loc[p, "sd_ratio_median"] for p in params
                 if np.isfinite(s.loc[p, "sd_ratio_median"]) and s.loc[p, "sd_ratio_median"] > 0]
    par_text = _fmt(float(np.median(par_ratio))) if par_ratio else ("point" if params else "-")
    h = cc.health
    health = (f"{'ok' if h.ok else 'NOT ok'}: r_hat {h.rhat_max:.3f}, ESS {h.ess_bulk_min:.0f}/{h.ess_tail_min:.0f}, "
              f"{h.divergences} div.")
    verdict = "PASS" if cc.passed else ("NUTS unhealthy" if not h.ok else "FAIL")
    return {
        "model": f"`{cc.method}`", "NUTS health": health, "voxels within 0.5 sd": within,
        "median sd ratio (voxels; parameters)": f"{_fmt(vox_ratio)}; {par_text}",
        "k-hat": _fmt(cc.khat, ".2f") if np.isfinite(cc.khat) or cc.khat == np.inf else "- (point)",
        "solver time": f"{cc.vb_seconds:.3g} s", "NUTS time (compile)": f"{cc.sample_seconds:.3g} s ({cc.compile_seconds:.3g} s)",
        "NUTS / solver": f"{cc.sample_seconds / max(cc.vb_seconds, 1e-9):.3g}x", "verdict": verdict,
    }


def markdown(rows: Sequence[dict], command: str) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(str(r[h]) for h in HEAD) + " |" for r in rows]
    lines.append("")
    lines.append(f"Produced by `{command}` on {platform.machine()} ({platform.processor() or 'cpu'}), "
                 "a machine shared with other jobs: times are noisy. Solver time: the second of two fits (the first "
                 "includes numba's compilation); NUTS time: sampling only, nutpie's compilation in brackets.")
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> None:
    """Replace the text between the marker lines (append the block if absent)."""
    text = path.read_text()
    block = f"{START}\n{table}\n{END}"
    pattern = re.compile(re.escape(START.split(" (")[0]) + r".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Cross-check every model (or those named) and print the Markdown table."""
    from . import crosscheck, phantoms
    from .crosscheck_models import CRITERIA
    from .models import REGISTRY

    p = argparse.ArgumentParser(prog="python -m bayesfuse.crosscheck_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="*", help="models (default: every model with a PyMC form and criteria)")
    p.add_argument("--phantom", default="outlier")
    p.add_argument("--downsample", type=int, default=8)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--tune", type=int, default=1000)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--readme", type=Path, help="write the table into this README between its marker lines")
    p.add_argument("--out", type=Path, help="also write each model's outputs to OUT/<model>/")
    args = p.parse_args(argv)
    methods = args.methods or [n for n, s in REGISTRY.items() if s.pymc and n in CRITERIA]
    raters = phantoms.make_phantom(args.phantom, random_seed=args.seed).raters
    rows = []
    for m in methods:
        data = raters.downsample(args.downsample, CRITERIA[m].downsample)
        cc = crosscheck.run(data, m, draws=args.draws, tune=args.tune, chains=args.chains, random_seed=args.seed,
                            note=f"phantom {args.phantom!r}, downsampled x{args.downsample}")
        print(cc.verdict(), file=sys.stderr)
        if args.out:
            cc.write(args.out / m, force=True)
        rows.append(row(cc))
    given = list(sys.argv[1:] if argv is None else argv)
    table = markdown(rows, " ".join(["python -m bayesfuse.crosscheck_table", *given]))
    print(table)
    if args.readme:
        update_readme(args.readme, table)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
